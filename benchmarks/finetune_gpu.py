"""LoRA / Q-LoRA training speed on one GPU: trained tokens/s, peak memory and MFU, random weights in the loaded layout.

    PYTHONPATH=. python benchmarks/finetune_gpu.py --markdown BENCHMARKS.md            # 72B-Int8 Q-LoRA, 7B, 14B
    PYTHONPATH=. python benchmarks/finetune_gpu.py --rows qlora-72b --layers 40      # fewer layers, extrapolated
    PYTHONPATH=. python benchmarks/finetune_gpu.py --preset tiny                       # the CPU smoke run

Each row runs in its own process (peak memory is per process, and an out-of-memory row cannot take the others
down): it builds random parameters on the device as qwen_jax.bench does (stacked layers; int8 values + float16
group scales for the Int8 rows), LoRA factors with Qwen's finetune.py settings (r 64, alpha 16, dropout 0.05 on
c_attn, both c_proj, w1, w2), AdamW state, and times micro-steps of the jitted training step (forward, per-layer
recomputation, LoRA gradients, an optax update every `grad_accum` micro-steps) at batch 1 × `seq` tokens, all trained.

MFU counts the model's useful FLOPs per trained token, not the recomputation: the frozen linears' forward and
input gradient (2 × 2N, N = weights of every linear including lm_head; the base has no weight gradient), attention
(causal: 2·L·S·d forward per token, twice that backward) and the adapters' forward and both gradients (6 × LoRA
parameters), divided by the step time and the device's dense bf16 peak.

A row with fewer layers than its preset (`--layers`) is measured as is and extrapolated to the full depth by
scaling its step time by full/layers (conservative: the embedding, lm_head and loss are scaled too) and its peak
memory by the per-layer bytes of weights, factors, gradients and optimizer state; such rows say so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ROWS = {  # name -> (preset, int8 weights, sequence length)
    "qlora-72b": ("72b", True, 2048),
    "lora-7b": ("7b", False, 2048),
    "lora-14b": ("14b", False, 2048),
    "qlora-tiny": ("tiny", True, 128),
    "lora-tiny": ("tiny", False, 128),
}
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12}
GROUP = {"tiny": 32}  # int8 group size per preset (default 128, as published)


def model_flops_per_token(config, seq: int, lora_params: int) -> float:
    """Useful training FLOPs per token (module docstring): frozen linears ×4N, attention, adapters ×6."""
    d, f, layers = config.hidden_size, config.mlp_width, config.num_hidden_layers
    linear = layers * (d * 3 * d + d * d + 3 * d * f) + d * config.vocab_size
    attention = layers * 2 * seq * d  # QKᵀ and PV, causal: half of S keys on average, 2 FLOPs per MAC
    return 4 * linear + 3 * attention + 6 * lora_params


def run_row(name: str, layers: int | None, steps: int, grad_accum: int) -> dict:
    """One row in this process: build, compile, time; a dict of figures (or the failure)."""
    import jax
    import numpy as np

    from qwen_jax.bench import peak_memory_gib, random_model
    from qwen_jax.config import preset
    from qwen_jax.finetune import data, lora, train

    preset_name, int8, seq = ROWS[name]
    config = preset(preset_name)
    full_layers = config.num_hidden_layers
    if layers:
        config = config.replace(num_hidden_layers=min(layers, full_layers))
    start = time.perf_counter()
    model = random_model(config, GROUP.get(preset_name, 128) if int8 else None)
    jax.block_until_ready(model.params)
    built = time.perf_counter() - start
    train_config = train.TrainConfig(batch_size=1, grad_accum=grad_accum, max_len=seq, max_steps=1000)
    trainer = train.Trainer(model, train_config, total_steps=1000)
    factors, opt_state = trainer.init(0)
    ids = np.random.default_rng(0).integers(0, 151643, (1, seq)).astype(np.int32)
    batch = data.Batch(ids, ids, np.array([seq]))
    start = time.perf_counter()
    factors, opt_state, out = trainer.step(factors, opt_state, batch, jax.random.key(1))
    jax.block_until_ready(out)
    compiled = time.perf_counter() - start
    times = []
    for i in range(steps):
        start = time.perf_counter()
        factors, opt_state, out = trainer.step(factors, opt_state, batch, jax.random.key(2 + i))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    lora_params = lora.num_params(factors)
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    row = {"row": name, "layers": config.num_hidden_layers, "full_layers": full_layers, "seq": seq,
           "build_s": built, "compile_s": compiled, "step_s": step_s, "loss": float(out["loss"]),
           "peak_gib": peak_memory_gib(), "lora_params": lora_params, "device": kind, "jax": jax.__version__}
    if config.num_hidden_layers < full_layers:
        scale = full_layers / config.num_hidden_layers
        per_layer = _per_layer_bytes(model.params, factors, config.num_hidden_layers)
        row.update(step_s_full=step_s * scale, extrapolated=True,
                   peak_gib_full=None if row["peak_gib"] is None else
                   row["peak_gib"] + (full_layers - config.num_hidden_layers) * per_layer / 2**30)
        config = config.replace(num_hidden_layers=full_layers)
        lora_params = int(lora_params * scale)
    full_step = row.get("step_s_full", step_s)
    row["tokens_per_s"] = seq / full_step
    peak = PEAK_BF16.get(kind)
    row["mfu"] = None if peak is None else model_flops_per_token(config, seq, lora_params) * seq / full_step / peak
    return row


def _per_layer_bytes(params, factors, layers: int) -> float:
    """Bytes one more layer adds: its weights, and its factors with their gradients, Adam moments and accumulator."""
    import jax

    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params["layers"]))
    lora_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(factors["layers"]))
    return (weights + 5 * lora_bytes) / layers


def _format(rows: list[dict]) -> list[str]:
    lines = ["| row | layers | seq | trained tokens/s | step s | peak GiB | MFU | compile s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | | | | | | | | failed: {r['error']} |")
            continue
        extrapolated = r.get("extrapolated")
        peak = r.get("peak_gib_full") if extrapolated else r["peak_gib"]
        measured_peak = "" if r["peak_gib"] is None else f", {r['peak_gib']:.1f} GiB"
        note = (f"measured {r['layers']} of {r['full_layers']} layers ({r['step_s']:.2f} s/step{measured_peak}); "
                "full depth extrapolated" if extrapolated else "")
        peak_text = "—" if peak is None else f"{peak:.1f}"
        mfu_text = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['row']} | {r['full_layers']} | {r['seq']} | {r['tokens_per_s']:.0f} | "
                     f"{r.get('step_s_full', r['step_s']):.2f} | {peak_text} | {mfu_text} | {r['compile_s']:.0f} | "
                     f"{note} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), help="default: the preset's rows")
    parser.add_argument("--preset", choices=["gpu", "tiny"], default="gpu",
                        help="gpu: 72B-Int8 Q-LoRA, 7B and 14B LoRA; tiny: both kinds on the tiny model (CPU)")
    parser.add_argument("--layers", type=int, help="build this many layers (extrapolated to the full depth)")
    parser.add_argument("--steps", type=int, default=8, help="timed micro-steps per row (median)")
    parser.add_argument("--grad-accum", type=int, default=8, help="micro-steps per optimizer update (Qwen: 8)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per row before it is stopped")
    parser.add_argument("--markdown", help="append the table to this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row here, print its JSON
    args = parser.parse_args(argv)

    if args.row:
        print(json.dumps(run_row(args.row, args.layers, args.steps, args.grad_accum)))
        return 0
    rows = args.rows or (["qlora-72b", "lora-7b", "lora-14b"] if args.preset == "gpu" else ["qlora-tiny", "lora-tiny"])
    results = []
    for name in rows:
        cmd = [sys.executable, __file__, "--row", name, "--steps", str(args.steps), "--grad-accum", str(args.grad_accum)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = out.stdout.strip().splitlines()
            if out.returncode or not lines:
                tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
                print(out.stderr[-3000:], file=sys.stderr)
                results.append({"row": name, "error": tail[:300]})
            else:
                results.append(json.loads(lines[-1]))
        except subprocess.TimeoutExpired:
            results.append({"row": name, "error": f"stopped after {args.timeout} s"})
        print("\n".join(_format(results[-1:])), file=sys.stderr)
    first = next((r for r in results if "device" in r), {"device": "?", "jax": "?"})
    command = "PYTHONPATH=. python benchmarks/finetune_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"### Fine-tuning (LoRA r 64 on c_attn, c_proj, w1, w2; batch 1; remat) — {first['device']}, "
              f"jax {first['jax']}, {time.strftime('%Y-%m-%d')}; `{command.strip()}`")
    text = "\n".join([header, "", *_format(results)])
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
