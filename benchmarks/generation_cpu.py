"""Generation on the host CPU: compilations in a 10-turn chat, and decode tokens/s by batch size.

    python benchmarks/generation_cpu.py [--write]   (--write appends the rows to BENCHMARKS.md)

Models are random checkpoints in the published format (qwen_jax.testing): the `tiny` preset, and a `small`
one (8 layers, hidden 512) big enough for the step time to be more than dispatch overhead.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time

import jax
import numpy as np

import qwen_jax
from qwen_jax import decoding as gen_lib
from qwen_jax import testing
from qwen_jax.config import preset

SMALL = preset("tiny").replace(hidden_size=512, num_hidden_layers=8, num_attention_heads=4, kv_channels=128,
                               intermediate_size=2816)


def compilations() -> np.ndarray:
    """Programs compiled so far: [prefill, decode]."""
    return np.array([gen_lib._prefill_chunk._cache_size(), gen_lib._decode._cache_size()])


def ten_turn_chat(model, tokenizer, max_new_tokens: int) -> tuple[np.ndarray, list[int], float]:
    """Compilations [prefill, decode] and prompt lengths over 10 chat turns (the checkpoint's sampling defaults)."""
    before, history, lengths = compilations(), [], []
    start = time.perf_counter()
    for turn in range(10):
        query = f"Question number {turn}: tell me something new about the topic we discussed."
        lengths.append(len(qwen_jax.build_chat_prompt(tokenizer, query, history)))
        _, history = qwen_jax.chat(model, tokenizer, query, history=history, seed=turn, max_new_tokens=max_new_tokens)
    return compilations() - before, lengths, time.perf_counter() - start


def decode_rate(model, batch: int, prompt_len: int = 32, new_tokens: int = 128) -> tuple[float, float]:
    """(decode tokens/s over the batch, prefill ms): greedy, no early stop, timed after a warm-up."""
    prompts = [list(np.random.default_rng(r).integers(0, 151643, prompt_len)) for r in range(batch)]

    def run(n):
        gen = gen_lib.GenerationConfig.resolve({}, max_new_tokens=n, do_sample=False, repetition_penalty=1.0)
        start = time.perf_counter()
        list(gen_lib.generate_tokens(model, prompts, gen))
        return time.perf_counter() - start

    run(1), run(new_tokens)  # compile both buffer sizes
    prefill = min(run(1) for _ in range(3))
    total = min(run(new_tokens) for _ in range(3))
    return batch * (new_tokens - 1) / (total - prefill), prefill * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="append rows to BENCHMARKS.md")
    args = parser.parse_args()
    device = f"host CPU ({jax.devices()[0].platform}, {jax.local_device_count()} device), jax {jax.__version__}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("tiny", preset("tiny")), ("small", SMALL)):
            # float32: XLA's CPU backend has no fast bfloat16 dot, so bfloat16 would time conversions, not decoding.
            model, tok = qwen_jax.load(testing.write_float_checkpoint(f"{tmp}/{name}", config), dtype="float32")
            (prefills, decodes), lengths, seconds = ten_turn_chat(model, tok, max_new_tokens=64)
            rows.append(f"| {name} ({config.num_params / 1e6:.0f}M) | 10-turn chat, 64 new tokens/turn, prompts "
                        f"{lengths[0]}→{lengths[-1]} tokens | {prefills + decodes} compilations ({prefills} prefill, "
                        f"{decodes} decode), {seconds:.1f} s in all |")
            for batch in (1, 8):
                rate, prefill_ms = decode_rate(model, batch)
                rows.append(f"| {name} ({config.num_params / 1e6:.0f}M) | float32 decode, batch {batch}, prompt 32, "
                            f"128 new tokens, greedy | {rate:.0f} tokens/s, prefill {prefill_ms:.0f} ms |")
    header = [f"\n### Generation on CPU — {device}, {datetime.date.today()}",
              "Command: `python benchmarks/generation_cpu.py --write`\n",
              "| model | run | result |", "|---|---|---|"]
    print("\n".join(header + rows))
    if args.write:
        with open("BENCHMARKS.md", "a") as f:
            f.write("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
