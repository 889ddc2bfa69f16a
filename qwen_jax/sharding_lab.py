"""Compare sharding strategies honestly: bytes per device, collectives in the compiled decode step, step time.

    rows = sweep("/models/tiny", ["replicated", "tp", "fsdp", "dp_tp"], [(1, 8), (2, 4)], batch=8)
    print(format_table(rows))
    print(format_table([training_report(model, "fsdp", TrainConfig(batch_size=8, max_len=256))]))  # a LoRA step

Collectives are read from the compiled HLO of one decode step (the program XLA will run), not from a model of
what the strategy should do; each report says whether the step ran the Pallas kernels or the XLA path.

Without the GPUs a mesh needs, `predict` estimates a step from the per-device program timed on one GPU
(`tp_shard_config`: the shard shapes one device of a tensor-parallel mesh holds) plus the collectives of the
strategy's compiled step (`abstract_collectives`, compiled for a mesh of simulated CPU devices), costed by a stated
`Interconnect` model.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import sharding as sharding_lib
from qwen_jax.model import QwenModel, apply

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_LINE = re.compile(r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[^ ]+) \(")
_WHILE = re.compile(r"body=%(?P<body>[^ ,]+).*?known_trip_count\":\{\"n\":\"(?P<n>\d+)\"")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    computations, current, entry = {}, None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            current = header["name"]
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def _per_run(hlo_text: str, pattern: re.Pattern) -> dict[str, list[int]]:
    """{match group "op": [count, result bytes]} of the instructions matching `pattern` that one run of compiled HLO
    executes: an instruction inside a loop body with a known trip count (the layer loop) counts once per iteration."""
    computations, entry = _computations(hlo_text)
    found: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def visit(name: str, times: int) -> None:
        for line in computations.get(name, ()):
            loop = _WHILE.search(line)
            if loop:
                visit(loop["body"], times * int(loop["n"]))
            match = pattern.search(line)
            if match:
                nbytes = sum(_DTYPE_BYTES.get(a["dtype"], 4) * int(np.prod([int(d) for d in a["dims"].split(",") if d]))
                             for a in _ARRAY.finditer(match["shape"]))
                found[match["op"]][0] += times
                found[match["op"]][1] += times * nbytes

    visit(entry, 1)
    return found


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{op: (count, bytes of results)} that one run of compiled HLO executes (async starts counted once)."""
    return {op: tuple(v) for op, v in _per_run(hlo_text, _COLLECTIVE_LINE).items()}


_TRITON_CALL = re.compile(r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>custom-call)\(.*custom_call_target=\"__gpu\$xla\.gpu\.triton\"")


def kernel_calls(hlo_text: str) -> int:
    """How many Pallas (Triton) kernels one run of compiled HLO launches."""
    return _per_run(hlo_text, _TRITON_CALL).get("custom-call", [0])[0]


def bytes_per_device(tree) -> list[int]:
    """Bytes each device of the tree's arrays holds (shards it owns), in device order."""
    per_device: dict[int, int] = collections.Counter()
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return [per_device[d] for d in sorted(per_device)]


@dataclasses.dataclass
class Report:
    strategy: str
    mesh: str
    batch: int
    kv_len: int
    param_bytes: list[int]  # per device
    cache_bytes: list[int]  # per device
    collectives: dict[str, tuple[int, int]]
    step_ms: float
    kernel_calls: int  # Pallas (Triton) custom calls one step runs: 0 means the XLA path ran

    def row(self) -> dict:
        coll = ", ".join(f"{op} ×{n} ({b / 1024:.1f} KiB)" for op, (n, b) in sorted(self.collectives.items()))
        return {"strategy": self.strategy, "mesh": self.mesh, "batch": self.batch,
                "path": f"kernels ×{self.kernel_calls}" if self.kernel_calls else "XLA",
                "params MiB/device": f"{max(self.param_bytes) / 2**20:.2f}",
                "cache MiB/device": f"{max(self.cache_bytes) / 2**20:.2f}",
                "collectives per step": coll or "none", "step ms": f"{self.step_ms:.2f}"}


def decode_step_fn(model: QwenModel):
    """One jitted decode step (batch of single tokens through the cache, greedy pick), under the model's mesh."""

    def step(params, tokens, positions, cache):
        alpha = jnp.ones(tokens.shape[0], jnp.float32)
        logits, cache = apply(model.module, params, tokens, positions, alpha, cache, **model.placement)
        return jnp.argmax(logits[:, 0], axis=-1), cache

    return jax.jit(step, donate_argnums=(3,))


def report(model: QwenModel, strategy: str, batch: int = 1, kv_len: int = 256, steps: int = 10) -> Report:
    """Measure `model` (already placed by `strategy` on `model.mesh`) for a decode step at `batch` × `kv_len`."""
    cache = model.new_cache(batch, kv_len)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), kv_len // 2, jnp.int32)
    step = decode_step_fn(model)
    compiled = step.lower(model.params, tokens, positions, cache).compile()
    hlo = compiled.as_text()
    found = collectives(hlo)
    cache_bytes = bytes_per_device(cache)
    _, cache = jax.block_until_ready(compiled(model.params, tokens, positions, cache))  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _, cache = jax.block_until_ready(compiled(model.params, tokens, positions, cache))
        times.append(time.perf_counter() - start)
    mesh = "×".join(f"{model.mesh.shape[a]}" for a in model.mesh.axis_names) if model.mesh is not None else "1"
    return Report(strategy, mesh, batch, kv_len, bytes_per_device(model.params), cache_bytes, found,
                  statistics.median(times) * 1e3, kernel_calls(hlo))


# --- predicting a mesh's step time without its GPUs ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """A stated cost model of collectives: each costs `latency_s`, plus its ring algorithm's bytes per device over
    `bandwidth` (bytes/s each device sends, what a large NCCL all-reduce reaches as "bus bandwidth"): an all-reduce
    moves 2(n−1)/n of its message, an all-gather (n−1)/n of its result, a reduce-scatter (n−1) results."""

    name: str
    latency_s: float
    bandwidth: float

    def seconds(self, found: dict[str, tuple[int, int]], devices: int) -> float:
        """Time of the collectives `found` (op: (count, result bytes), as `collectives` reads them) on `devices`."""
        share = (devices - 1) / devices
        factor = {"all-reduce": 2 * share, "all-gather": share, "reduce-scatter": devices - 1, "all-to-all": share,
                  "collective-permute": 1.0}
        return sum(count * self.latency_s + factor[op] * nbytes / self.bandwidth
                   for op, (count, nbytes) in found.items())


# Assumptions, not measurements (no multi-GPU machine was lent): NVLink 4 gives each H100/H200 SXM 450 GB/s per
# direction, of which NCCL's ring all-reduce reaches ~360 GB/s of bus bandwidth on 8 GPUs; a small all-reduce costs
# ~10 µs on the NVSwitch (NCCL's low-latency protocol). Decode messages are small, so the latency term dominates.
INTERCONNECTS = {"H100": Interconnect("NVLink 4 via NVSwitch, H100 SXM", 10e-6, 360e9),
                 "H200": Interconnect("NVLink 4 via NVSwitch, H200 SXM", 10e-6, 360e9)}


def tp_shard_config(config, devices: int):
    """The config of what one device of a `devices`-way Megatron tensor-parallel mesh holds and runs: 1/n of the
    heads, of the MLP and of the (vocab-parallel) embedding and lm_head, the full hidden size. Its decode step on
    one GPU is that device's program, less the collectives."""
    c = config
    for name, size in (("heads", c.num_attention_heads), ("intermediate_size", c.intermediate_size // 2),
                       ("vocab_size", c.vocab_size)):
        if size % devices:
            raise sharding_lib.ShardingError(f"{name} {size} does not split {devices} ways")
    return c.replace(num_attention_heads=c.num_attention_heads // devices,
                     intermediate_size=c.intermediate_size // devices, vocab_size=c.vocab_size // devices)


def abstract_collectives(config, strategy, mesh_shape: tuple[int, int], batch: int, kv_len: int, dtype=jnp.bfloat16,
                         quant_group: int | None = None, devices=None) -> dict[str, tuple[int, int]]:
    """The collectives of `strategy`'s compiled decode step for `config` on a data×model mesh of `devices` (default:
    all), compiled from shapes alone: nothing is allocated, so 72B's step compiles for simulated CPU devices. (On a
    GPU host, call it where JAX runs on the CPU backend; there the XLA path is compiled, whose collectives the
    kernel path repeats with float32 partial sums.)"""
    from qwen_jax.model import abstract_params
    from qwen_jax.cache import init_cache

    mesh = sharding_lib.make_mesh({"data": mesh_shape[0], "model": mesh_shape[1]},
                                  (devices or jax.devices())[: mesh_shape[0] * mesh_shape[1]])
    rules = sharding_lib.get_rules(strategy)
    boxes = abstract_params(config, dtype, quant_group)
    sharding_lib.check(boxes, mesh, rules)
    params = jax.tree_util.tree_map(lambda box, sh: jax.ShapeDtypeStruct(box.value.shape, box.value.dtype, sharding=sh),
                                    boxes, sharding_lib.shardings(boxes, mesh, rules),
                                    is_leaf=lambda x: hasattr(x, "names") and hasattr(x, "value"))
    model = QwenModel(config, params, dtype, quant_group, mesh=mesh, rules=rules)
    cache = jax.eval_shape(lambda: init_cache(config, batch, kv_len, dtype, mesh, rules))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    compiled = decode_step_fn(model).lower(model.params, tokens, tokens, cache).compile()
    return collectives(compiled.as_text())


def sweep(path, strategies: Iterable[str], mesh_shapes: Sequence[tuple[int, int]], batch: int = 8,
          kv_len: int = 256, dtype="float32", devices=None) -> list[Report]:
    """Load the checkpoint at `path` under every (strategy, data×model mesh) pair and `report` each."""
    from qwen_jax.loading import load

    reports = []
    for strategy in strategies:
        for data, model_axis in mesh_shapes:
            mesh = sharding_lib.make_mesh({"data": data, "model": model_axis}, devices)
            model, _ = load(path, dtype=dtype, mesh=mesh, strategy=strategy)
            reports.append(report(model, strategy, batch, kv_len))
            del model
    return reports


def format_table(reports: Sequence[Report]) -> str:
    rows = [r.row() for r in reports]
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)) + " |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class TrainingReport:
    """One LoRA training micro-step (qwen_jax.finetune) under a strategy: bytes per device of what lives across
    steps, the compiled step's temporaries (activations, gradients, recomputed layers), collectives, time."""

    strategy: str
    mesh: str
    batch: int
    seq: int
    param_bytes: list[int]  # the frozen base, per device
    factor_bytes: list[int]  # LoRA factors (their gradients take as much again, inside the step)
    optimizer_bytes: list[int]  # AdamW moments and the accumulated gradients
    temp_bytes: int  # per device, from the compiled program's memory analysis
    collectives: dict[str, tuple[int, int]]
    step_ms: float

    def row(self) -> dict:
        coll = ", ".join(f"{op} ×{n} ({b / 2**20:.1f} MiB)" for op, (n, b) in sorted(self.collectives.items()))
        mib = lambda values: f"{max(values) / 2**20:.2f}"  # noqa: E731
        return {"strategy": self.strategy, "mesh": self.mesh, "batch × seq": f"{self.batch} × {self.seq}",
                "base MiB/device": mib(self.param_bytes), "LoRA MiB/device": mib(self.factor_bytes),
                "optimizer MiB/device": mib(self.optimizer_bytes), "temporaries MiB/device": f"{self.temp_bytes / 2**20:.2f}",
                "collectives per step": coll or "none", "step ms": f"{self.step_ms:.2f}"}


def training_report(model: QwenModel, strategy: str, config=None, steps: int = 3) -> TrainingReport:
    """Measure one training micro-step of `model` (placed by `strategy`) at config.batch_size × config.max_len."""
    from qwen_jax.finetune import data, train

    config = config or train.TrainConfig(batch_size=8, max_len=256)
    trainer = train.Trainer(model, config, total_steps=1000)
    factors, opt_state = trainer.init(0)
    ids = np.zeros((config.batch_size, config.max_len), np.int32)
    batch = data.Batch(ids, ids, np.full(config.batch_size, config.max_len))
    factor_bytes, optimizer_bytes = bytes_per_device(factors), bytes_per_device(opt_state)
    ids, labels = trainer.place_batch(batch)
    compiled = train._train_step.lower(trainer.program, factors, opt_state, model.params, ids, labels,
                                       jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    times = []
    for i in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        factors, opt_state, out = compiled(factors, opt_state, model.params, ids, labels, jax.random.key(i))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    mesh = "×".join(f"{trainer.program.mesh.shape[a]}" for a in trainer.program.mesh.axis_names)
    return TrainingReport(strategy, mesh, config.batch_size, config.max_len, bytes_per_device(model.params),
                          factor_bytes, optimizer_bytes, getattr(memory, "temp_size_in_bytes", 0),
                          collectives(compiled.as_text()), statistics.median(times[1:]) * 1e3)
