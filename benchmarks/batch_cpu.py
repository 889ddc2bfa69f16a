"""A batch job (continuous batching) against sequential `chat()` calls, on the host CPU with the tiny model.

    python benchmarks/batch_cpu.py [--prompts 1000] [--sequential 150] [--slots 32] [--write]

The job: N chat queries of mixed lengths (5 to ~400 prompt tokens), greedy, up to --max-new-tokens each. The
sequential baseline runs the first --sequential of the same queries one `chat()` call at a time (its rate is
per request, so a subset measures it; 1,000 sequential calls would take most of the time budget). Both are
timed after a warm-up that compiles their programs. --write appends the rows to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import qwen_jax
from qwen_jax import batch as batch_lib
from qwen_jax import decoding, testing

WORDS = "the a model token batch slot cache prompt fast quiet river stone light north paper seven".split()


def queries(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths: most short, a long tail (as evaluation sets are)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(1 / 60, n) + 3, 380)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in lengths]


def run_batch(model, tok, qs, workdir: Path, args) -> dict:
    src, out = workdir / "in.jsonl", workdir / "out.jsonl"
    src.write_text("".join(json.dumps({"id": i, "query": q}) + "\n" for i, q in enumerate(qs)))
    out.unlink(missing_ok=True)
    return batch_lib.run_job(model, tok, src, out, max_new_tokens=args.max_new_tokens, do_sample=False,
                             num_slots=args.slots, chunk=args.chunk, max_group=args.max_group, progress=False)


def run_sequential(model, tok, qs, args) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    for q in qs:
        response, _ = qwen_jax.chat(model, tok, q, max_new_tokens=args.max_new_tokens, do_sample=False)
        tokens += len(tok.encode(response)) if response else 0
    return time.perf_counter() - start, tokens


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--sequential", type=int, default=150)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--max-group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    model, tok = qwen_jax.load(testing.default_checkpoint_dir(), dtype="float32")
    qs = queries(args.prompts)
    lengths = [len(qwen_jax.build_chat_prompt(tok, q)) for q in qs]
    with tempfile.TemporaryDirectory() as tmp:
        run_batch(model, tok, qs[:3 * args.slots], Path(tmp), args)  # warm-up: compiles most programs
        before = decoding._decode._cache_size()
        summary = run_batch(model, tok, qs, Path(tmp), args)
        decode_compiles = decoding._decode._cache_size() - before
    seq_qs = qs[:args.sequential]
    run_sequential(model, tok, seq_qs[:20], args)  # warm-up
    seq_seconds, _ = run_sequential(model, tok, seq_qs, args)
    # chat() drops the stop token and strips; count the sequential tokens as the batch job does, per request
    seq_rate_req = len(seq_qs) / seq_seconds
    batch_rate_req = summary["completed"] / summary["seconds"]
    tok_per_req = summary["completion_tokens"] / summary["completed"]
    rows = [
        ("batch job", f"{summary['completed']} requests in {summary['seconds']:.1f} s: {batch_rate_req:.1f} req/s, "
                      f"{summary['tokens_per_s']:.0f} generated tokens/s ({tok_per_req:.1f} tokens/request); "
                      f"slot occupancy {summary['engine_slot_occupancy']:.1%}, prefill padding "
                      f"{summary['engine_prefill_padding']:.1%}, {summary['engine_prefill_calls']} prefill calls, "
                      f"{summary['engine_decode_calls']} decode calls, decode recompiles during the job: "
                      f"{decode_compiles}"),
        ("sequential chat()", f"first {len(seq_qs)} of the same queries: {seq_seconds:.1f} s, "
                              f"{seq_rate_req:.1f} req/s (≈ {seq_rate_req * tok_per_req:.0f} tokens/s at the batch "
                              f"job's tokens/request)"),
        ("speed-up", f"{batch_rate_req / seq_rate_req:.1f}× requests/s"),
    ]
    header = (f"\n### Batch job vs sequential chat() — host CPU ({jax.devices()[0].platform}, {os.cpu_count()} cores), "
              f"jax {jax.__version__}, {datetime.date.today()}\n"
              f"Command: `python benchmarks/batch_cpu.py --prompts {args.prompts} --sequential {args.sequential} "
              f"--slots {args.slots} --chunk {args.chunk} --max-new-tokens {args.max_new_tokens} --write`; tiny "
              f"model (20M, float32), greedy, chat prompts {min(lengths)}–{max(lengths)} tokens "
              f"(median {int(np.median(lengths))})\n\n| run | result |\n|---|---|\n")
    text = header + "".join(f"| {name} | {result} |\n" for name, result in rows)
    print(text)
    if args.write:
        with open(Path(__file__).parent.parent / "BENCHMARKS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
