"""`python -m qwen_jax.bench`: decode and prefill speed against the memory-bandwidth floor, on any device.

    python -m qwen_jax.bench --preset 72b --batch 1 --context 1 --new-tokens 256
    python -m qwen_jax.bench --preset 72b --layers 8 --weights bf16 --hf      # + HF Transformers, same shapes
    python -m qwen_jax.bench --preset 72b --context 4096 --kv-dtype int8 --embedding host   # long context

Weights are random, built on the device directly in the converted layout (stacked layers, int8 values + float16
group scales, or float), so any preset runs without a checkpoint. One run measures the device's read ceiling
(`read_bandwidth`), then prefill time and decode tokens/s, and prints: tokens/s, ms/token, GB/s moved per decode
step (all weights but the embedding table, plus the KV cache read), % of the read ceiling, and peak device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import sharding as sharding_lib
from qwen_jax.cache import MemoryPreflightError, cache_bytes
from qwen_jax.config import QwenConfig, preset
from qwen_jax.decoding import GenerationConfig, generate_tokens
from qwen_jax.model import QwenModel, abstract_params


def median_seconds(fn, *args, reps: int = 10) -> float:
    """Median wall time of `fn(*args)` after one warm-up call, blocking on the results."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(gib: float = 4.0) -> float:
    """GB/s of `y = x * 2` over a `gib` GiB bfloat16 array, bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    double = jax.jit(lambda a: a * 2).lower(x).compile()
    seconds = median_seconds(double, x, reps=20)
    del x
    return 2 * n * 2 / seconds / 1e9


def read_bandwidth(gib: float = 4.0) -> float:
    """The read ceiling kernels are judged against: GB/s of the best of several streaming reads of `gib` GiB.

    XLA's row and column sums of an int32 array, and (on a GPU) cuBLAS's bf16 GEMV of a 8192×49152 matrix at M = 1,
    bytes read only. `x * 2` is no ceiling: on H200s it moved 2.95–3.78 TB/s (reads and writes counted) in runs whose
    reads reached 3.39–3.76 (BENCHMARKS.md, session 5).
    """
    words = int(gib * 2**30) // 4 // 1024
    x = jax.random.bits(jax.random.key(0), (words, 1024), jnp.uint32)
    best = 0.0
    for reduce in (lambda a: jnp.sum(a, axis=1), lambda a: jnp.sum(a, axis=0)):
        fn = jax.jit(reduce).lower(x).compile()
        best = max(best, x.nbytes / median_seconds(fn, x, reps=10) / 1e9)
    del x
    if jax.default_backend() == "gpu":
        k, n, calls = 8192, 49152, 4  # distinct matrices per timed call: no read comes from L2
        ws = [jax.random.normal(key, (k, n), jnp.bfloat16) for key in jax.random.split(jax.random.key(1), calls)]
        v = jnp.ones((1, k), jnp.bfloat16)
        gemv = jax.jit(lambda v, ws: [jnp.dot(v, w) for w in ws]).lower(v, ws).compile()
        best = max(best, calls * 2 * k * n / median_seconds(gemv, v, ws, reps=10) / 1e9)
    return best


def random_params(config: QwenConfig, dtype, quant_group: int | None, mesh, rules) -> dict:
    """Random parameters in the loaded layout, each array created in its shards (never whole on one device)."""
    abstract = abstract_params(config, dtype, quant_group)
    shardings = sharding_lib.shardings(abstract, mesh, rules)
    specs = jax.tree_util.tree_map(lambda box: box.value, abstract,
                                   is_leaf=lambda x: hasattr(x, "names") and hasattr(x, "value"))
    leaves, treedef = jax.tree_util.tree_flatten(specs)
    keys = jax.random.split(jax.random.key(0), len(leaves))

    def make(key, spec):
        if spec.dtype == jnp.int8:  # a hash of the index: one fused elementwise pass, no 4-byte-per-value RNG buffer
            h = sum(jax.lax.broadcasted_iota(jnp.uint32, spec.shape, d) * jnp.uint32(p)
                    for d, p in enumerate((2654435761, 2246822519, 3266489917, 668265263, 374761393)[:len(spec.shape)]))
            h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
            return jax.lax.bitcast_convert_type((h >> 24).astype(jnp.uint8), jnp.int8)
        if spec.dtype == jnp.float16:  # group scales: GPTQ-like magnitudes keep activations finite
            return jax.random.uniform(key, spec.shape, jnp.float32, 1e-4, 2e-4).astype(jnp.float16)
        return (0.02 * jax.random.normal(key, spec.shape, jnp.float32)).astype(spec.dtype)

    out = [jax.jit(make, static_argnums=1, out_shardings=sharding)(key, spec)
           for key, spec, sharding in zip(keys, leaves, jax.tree_util.tree_leaves(shardings))]
    return jax.tree_util.tree_unflatten(treedef, out)


def random_model(config: QwenConfig, quant_group: int | None, kv_dtype=None) -> QwenModel:
    """A bfloat16 model of `random_params` on the first device (int8 linears with groups of `quant_group`)."""
    mesh = sharding_lib.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    params = random_params(config, jnp.bfloat16, quant_group, mesh, ())
    return QwenModel(config, params, jnp.bfloat16, quant_group, mesh=mesh, rules=(), kv_dtype=kv_dtype)


def streamed_bytes(model: QwenModel, batch: int, context: int) -> int:
    """Bytes one decode step must read: every parameter but the embedding table (one row per token), + KV cache."""
    weights = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(model.params)
                  if path[0].key != "wte")
    return weights + cache_bytes(model.config, batch, context, model.cache_dtype)


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


@dataclasses.dataclass
class Result:
    label: str
    batch: int
    context: int
    new_tokens: int
    prefill_ms: float
    tokens_per_s: float
    ms_per_token: float
    gb_per_s: float
    pct_read: float  # of the read ceiling measured in the same run
    peak_gib: float | None
    note: str = ""  # why a run has no figures (refused by the preflight, out of memory)

    @classmethod
    def unmeasured(cls, label: str, batch: int, context: int, new_tokens: int, note: str) -> "Result":
        return cls(label, batch, context, new_tokens, *[float("nan")] * 5, None, note)


def run_model(model: QwenModel, batch: int, context: int, new_tokens: int, read_gbps: float, label: str,
              reps: int = 2) -> Result:
    """Prefill `context` random tokens per row, then decode `new_tokens` greedily (no stop token).

    A request the preflight refuses, or one that runs out of device memory, gives a row saying so."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 151643, context).tolist() for _ in range(batch)]

    def timed(n):
        gen = GenerationConfig.resolve({}, max_new_tokens=n, do_sample=False, repetition_penalty=1.0)
        start = time.perf_counter()
        list(generate_tokens(model, prompts, gen))
        return time.perf_counter() - start

    try:
        timed(1), timed(new_tokens)  # compile prefill and decode for both buffer sizes
    except MemoryPreflightError as e:
        return Result.unmeasured(label, batch, context, new_tokens, f"refused by the preflight: {e}")
    except Exception as e:  # XLA's out-of-memory error has no type of its own
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Result.unmeasured(label, batch, context, new_tokens,
                                 "out of device memory: " + str(e).splitlines()[0][:300])
    prefill = min(timed(1) for _ in range(3))
    total = min(timed(new_tokens) for _ in range(reps))
    decode_s = (total - prefill) / (new_tokens - 1)
    mean_context = context + new_tokens / 2
    moved = streamed_bytes(model, batch, int(mean_context))
    gbps = moved / decode_s / 1e9
    return Result(label, batch, context, new_tokens, prefill * 1e3, batch / decode_s, decode_s * 1e3, gbps,
                  100 * gbps / read_gbps, peak_memory_gib())


HF_SCRIPT = r"""
import json, sys, time, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
a = json.loads(sys.argv[1])
cfg = Qwen2Config(vocab_size=a["vocab"], hidden_size=a["d"], intermediate_size=a["f"], num_hidden_layers=a["layers"],
                  num_attention_heads=a["heads"], num_key_value_heads=a["heads"], max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": a["base"]}, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cuda"):
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
ids = torch.randint(0, 151643, (a["batch"], a["context"]), device="cuda")
extra = {"cache_implementation": "static"} if a["static"] else {}  # static: generate compiles the forward
def gen(n):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, **extra)
    torch.cuda.synchronize(); return time.perf_counter() - t
gen(2); gen(a["new"])
t1, tn = min(gen(1) for _ in range(2)), gen(a["new"])
print(json.dumps({"prefill_ms": t1 * 1e3, "tokens_per_s": a["batch"] * (a["new"] - 1) / (tn - t1),
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
"""


HF_MODES = {"eager": "HF transformers bf16 generate",
            "static": "HF transformers bf16 generate, static cache (compiled)"}


def run_hf(config: QwenConfig, batch: int, context: int, new_tokens: int, mode: str) -> dict:
    """HF Transformers' Qwen2 (bf16, random weights, same shapes) in a separate process: JAX holds the GPU here.

    mode "eager": generate with its dynamic cache; "static": its static cache, with which generate compiles the
    forward (torch.compile). Returns the figures, or {"error": …} if that mode failed."""
    args = {"vocab": config.vocab_size, "d": config.hidden_size, "f": config.mlp_width,
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads, "base": config.rotary_emb_base,
            "batch": batch, "context": context, "new": new_tokens, "static": mode == "static"}
    out = subprocess.run([sys.executable, "-c", HF_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        print(f"[bench] HF {mode} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return {"error": out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[Result], read_gbps: float, header: str) -> str:
    lines = [f"### {header}", "",
             f"Read ceiling measured in the same run (`bench.read_bandwidth`): {read_gbps:.0f} GB/s.", "",
             "| run | batch | context | new | prefill ms | tokens/s | ms/token | GB/s | % of read | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.note:
            lines.append(f"| {r.label} | {r.batch} | {r.context} | {r.new_tokens} | {r.note} ||||||")
            continue
        peak = "—" if r.peak_gib is None else f"{r.peak_gib:.1f}"
        lines.append(f"| {r.label} | {r.batch} | {r.context} | {r.new_tokens} | {r.prefill_ms:.1f} | "
                     f"{r.tokens_per_s:.1f} | {r.ms_per_token:.2f} | {r.gb_per_s:.0f} | {r.pct_read:.0f}% | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="72b")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--weights", choices=["int8", "bf16"], default="int8")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2, help="timed decode runs per row (the fastest counts)")
    parser.add_argument("--kv-dtype", nargs="+", default=["bf16"], choices=["bf16", "int8"],
                        help="KV cache dtype(s); each is a row")
    parser.add_argument("--embedding", nargs="+", default=["device"], choices=["device", "host"],
                        help="where the embedding table lives; each is a row (device rows run first)")
    parser.add_argument("--hf", nargs="*", choices=sorted(HF_MODES), default=None,
                        help="also time HF Transformers bf16 on the same shapes (modes; default: eager static)")
    parser.add_argument("--markdown", help="append the table to this file (e.g. BENCHMARKS.md)")
    args = parser.parse_args(argv)

    config = preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    quant_group = args.group_size if args.weights == "int8" else None
    hf_results = []
    # HF first: once JAX's client starts it holds most of the GPU memory until this process exits
    for mode in (args.hf or sorted(HF_MODES)) if args.hf is not None else ():
        for batch in args.batch:
            for context in args.context:
                hf = run_hf(config, batch, context, args.new_tokens, mode)
                bf16_bytes = 2 * (config.num_params - config.vocab_size * config.hidden_size)
                moved = bf16_bytes + cache_bytes(config, batch, context + args.new_tokens // 2, jnp.bfloat16)
                hf_results.append((HF_MODES[mode], batch, context, hf, moved))
    read_gbps = read_bandwidth(4.0 if jax.default_backend() == "gpu" else 0.25)
    start = time.perf_counter()
    model = random_model(config, quant_group)
    jax.block_until_ready(model.params)
    print(f"[bench] {config.num_hidden_layers}-layer {args.preset} ({args.weights}) placed in "
          f"{time.perf_counter() - start:.1f} s; read ceiling {read_gbps:.0f} GB/s", file=sys.stderr)
    results = []
    for embedding in sorted(set(args.embedding)):  # "device" < "host": moving the table to the host is one-way
        if embedding == "host":
            model = model.with_embedding_on_host()
        for batch in args.batch:
            for context in args.context:
                for kv in args.kv_dtype:
                    label = f"qwen_jax {args.weights}, KV {kv}, embedding on {embedding}"
                    kv_model = dataclasses.replace(model, kv_dtype=jnp.int8 if kv == "int8" else jnp.bfloat16)
                    results.append(run_model(kv_model, batch, context, args.new_tokens, read_gbps, label, args.reps))
                    print(table(results[-1:], read_gbps, "partial"), file=sys.stderr)
    del model, kv_model
    for label, batch, context, hf, moved in hf_results:
        if "error" in hf:
            results.append(Result.unmeasured(label, batch, context, args.new_tokens, f"failed: {hf['error']}"))
            continue
        gbps = moved * hf["tokens_per_s"] / batch / 1e9
        results.append(Result(label, batch, context, args.new_tokens, hf["prefill_ms"], hf["tokens_per_s"],
                              1e3 * batch / hf["tokens_per_s"], gbps, 100 * gbps / read_gbps, hf["peak_gib"]))
    device = jax.devices()[0]
    header = (f"{args.preset} × {config.num_hidden_layers} layers, {args.weights} — "
              f"{getattr(device, 'device_kind', device.platform)}, jax {jax.__version__}, {datetime.date.today()}; "
              f"`python -m qwen_jax.bench {' '.join(argv if argv is not None else sys.argv[1:])}`")
    text = table(results, read_gbps, header)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
