"""`python -m convert SRC DST` / `qwen-jax-convert SRC DST`."""

from __future__ import annotations

import argparse
import sys
import time

from convert import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen-jax-convert",
        description="Convert a Qwen (v1) checkpoint directory (GPTQ Int8 as published, or float safetensors) into "
                    "qwen_jax's sharded orbax layout; load the result with qwen_jax.load(DST).")
    parser.add_argument("src", help="source checkpoint directory (config.json, safetensors shards, ...)")
    parser.add_argument("dst", help="new output directory (must not exist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        dst = convert(args.src, args.dst, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"qwen-jax-convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {dst} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
