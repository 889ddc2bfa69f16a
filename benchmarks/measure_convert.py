"""Measure the converter on a synthetic GPTQ Int8 checkpoint of a real size: peak host memory, time, load times.

    python benchmarks/measure_convert.py --preset 14b --workdir /work/tmp-convert   (~15 GB + ~15 GB of disk)

Writes a random GPTQ checkpoint of the preset's shapes (qwen_jax.testing), then runs, each in a fresh process:
`python -m convert SRC DST`, `qwen_jax.load(SRC)` (GPTQ on the fly) and `qwen_jax.load(DST)` (orbax), reporting
wall time, peak RSS (VmHWM: anonymous memory plus mapped file pages) and peak anonymous RSS (sampled every 20 ms;
the memory the process really owns, file pages being reclaimable page cache). Deletes both unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2 ** 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _measured(step) -> dict:
    """Run `step()` in this process, sampling anonymous RSS; returns seconds and peaks in GiB."""
    peak_anon, done = [_status_kib("RssAnon")], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak_anon.append(max(peak_anon[-1], _status_kib("RssAnon")))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(_status_kib("VmHWM") * 1024 / GIB, 2),
            "peak_anon_gib": round(peak_anon[-1] * 1024 / GIB, 2)}


def _child(step: str, src: str, dst: str) -> None:
    """One measured step, in its own process so that its peaks are its own; prints a JSON line."""
    if step == "convert":
        from convert import convert

        result = _measured(lambda: convert(src, dst, progress=False))
    else:
        import jax
        import qwen_jax

        def load():
            model, _ = qwen_jax.load(src if step == "load_gptq" else dst)
            jax.block_until_ready(model.params)

        result = _measured(load)
    print(json.dumps({"step": step, **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="14b")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    from qwen_jax import testing
    from qwen_jax.config import preset

    src, dst = args.workdir / f"{args.preset}-gptq", args.workdir / f"{args.preset}-converted"
    shutil.rmtree(dst, ignore_errors=True)
    if not (src / "config.json").is_file():
        start = time.perf_counter()
        testing.write_gptq_checkpoint(src, preset(args.preset), group_size=args.group_size, num_shards=args.shards)
        print(f"wrote {src} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in src.iterdir())
    results = {"preset": args.preset, "source_gib": round(size / GIB, 2)}
    try:
        for step in ("convert", "load_gptq", "load_converted"):
            child = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--child", step,
                                    str(src), str(dst)], capture_output=True, text=True)
            if child.returncode:
                raise RuntimeError(f"{step} failed:\n{child.stderr[-3000:]}")
            results[step] = json.loads(child.stdout.strip().splitlines()[-1])
            print(json.dumps(results[step]), file=sys.stderr)
        results["converted_gib"] = round(sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / GIB, 2)
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
