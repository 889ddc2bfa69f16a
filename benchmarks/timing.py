"""Shared helpers of the benchmark scripts: device description, copy bandwidth, timing, random int8 weights.

Timing follows the device tool's METHOD.md: compile and warm up first, block on the results, take medians, and
give every call in a timed batch its own inputs so that XLA can neither merge calls nor reuse a dequantized weight.
"""

from __future__ import annotations

import datetime
import platform

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.bench import copy_bandwidth, median_seconds, read_bandwidth  # noqa: F401  (shared with the model bench)


def rel_err(y, ref) -> float:
    """‖y − ref‖ / ‖ref‖ in float64."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def describe() -> str:
    """'<device kind>, jax <version>, <date>' for tables."""
    dev = jax.devices()[0]
    return f"{getattr(dev, 'device_kind', dev.platform)}, jax {jax.__version__}, {datetime.date.today().isoformat()}"


def host() -> str:
    return f"{platform.machine()} host CPU, jax {jax.__version__}, {datetime.date.today().isoformat()}"


def int8_weight(key, k: int, n_shape: tuple[int, ...], group: int = 128):
    """Random (qvalue int8 [K, *N], scales float16 [K // group, *N]) with GPTQ-like scale magnitudes."""
    kq, ks = jax.random.split(key)
    q = jax.lax.bitcast_convert_type(jax.random.bits(kq, (k, *n_shape), jnp.uint8), jnp.int8)
    s = jax.random.uniform(ks, (k // group, *n_shape), jnp.float32, 1e-3, 2e-3).astype(jnp.float16)
    return q, s


def weight_bytes(q, s) -> int:
    return q.size * q.dtype.itemsize + s.size * s.dtype.itemsize


def compile_many(fn, sets):
    """A compiled function of `sets` that makes one independent call `fn(*args)` per set and returns all outputs."""
    return jax.jit(lambda sets: [fn(*args) for args in sets]).lower(sets).compile()


def per_call_seconds(fn, sets: list, reps: int = 10):
    """(seconds per call of `fn` with the fixed dispatch cost removed, the output of the first call).

    Times one compiled batch of calls over all sets and one over a quarter of them: dividing the difference by the
    difference in calls cancels the host-side overhead that a single batch would include.
    """
    small = sets[: max(1, len(sets) // 4)]
    big_fn, small_fn = compile_many(fn, sets), compile_many(fn, small)
    seconds = (median_seconds(big_fn, sets, reps=reps) - median_seconds(small_fn, small, reps=reps)) / (
        len(sets) - len(small))
    return seconds, big_fn(sets)[0]


def append_markdown(path: str, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
