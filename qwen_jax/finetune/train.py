"""The LoRA training loop: optax (AdamW, warm-up + cosine, clipping, gradient accumulation) over the frozen base.

    model, tokenizer = qwen_jax.load("/models/Qwen-7B-Chat", mesh=mesh, strategy="fsdp")
    result = finetune(model, tokenizer, "train.json", "out/", eval_path="eval.json", config=TrainConfig(max_steps=100))

Compute runs in the model's dtype (bfloat16 by default) with float32 factors and optimizer state. Everything is
placed by the model's rules table: base weights as loaded, each factor like the axis of W it multiplies (a by W's
input axis, b by its output axes), gradients and optimizer moments like their factors, batches by `batch`/`seq`.
The output directory holds `checkpoints/` (orbax; a rerun with the same directory resumes from the newest),
`metrics.jsonl`, `data_problems.txt` and, at the end, the PEFT adapter `adapter_config.json` +
`adapter_model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax
from tqdm.auto import tqdm

from qwen_jax import sharding as sharding_lib
from qwen_jax.finetune import adapters, data, lora, objective, state
from qwen_jax.model import Qwen, QwenModel
from qwen_jax.tokenizer import QwenTokenizer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Qwen finetune.py's LoRA defaults (AdamW lr 3e-4, weight decay 0.1, β2 0.95, 1% warm-up, cosine decay,
    gradient clipping at 1.0 as HF's Trainer, rematerialization on)."""

    lora: lora.LoraConfig = lora.LoraConfig()
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0
    batch_size: int = 1  # rows per micro-batch (divisible by the mesh's batch split)
    grad_accum: int = 8  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; default: `epochs` passes over the data
    max_len: int = 2048
    seed: int = 0
    remat: bool = True
    save_every: int = 50  # optimizer steps between checkpoints (and one at the end)
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end, if there is eval data)
    on_error: str = "skip"  # bad samples: "skip" (reported) or "raise"
    on_overlong: str = "truncate"  # over max_len: "truncate" (reported), "skip" or "raise"


def schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Learning rate by optimizer step: linear warm-up from 0, then cosine decay to 0 at `total_steps`."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(total_steps, warmup + 1))


def optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clip, then AdamW; gradients averaged over `grad_accum` micro-batches (optax.MultiSteps)."""
    inner = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                        optax.adamw(schedule, config.adam_b1, config.adam_b2, config.adam_eps,
                                    weight_decay=config.weight_decay))
    return optax.MultiSteps(inner, every_k_schedule=config.grad_accum)


@dataclasses.dataclass(frozen=True)
class Program:
    """What the jitted training functions depend on, hashable: runs of the same model, config, length and placement
    (a rerun, a resume in the same process) reuse their compilations."""

    module: Qwen
    config: TrainConfig
    total_steps: int
    mesh: Mesh
    rules: sharding_lib.Rules

    @functools.cached_property
    def specs(self) -> dict:
        c = self.module.config
        return lora.factor_specs(c, lora.select(c, self.config.lora), self.config.lora.r)

    @functools.cached_property
    def factor_shardings(self) -> dict:
        return lora.shardings(self.specs, self.mesh, self.rules)

    @functools.cached_property
    def optimizer(self) -> optax.GradientTransformation:
        return optimizer(self.config, schedule(self.config, self.total_steps))

    @functools.cached_property
    def state_shardings(self):
        """The optimizer's moments placed like their factors, its counters replicated."""
        abstract = jax.tree_util.tree_map(lambda box: box.value, self.specs, is_leaf=_is_box)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return optax.tree_map_params(self.optimizer, lambda _, sharding: sharding,
                                     jax.eval_shape(self.optimizer.init, abstract), self.factor_shardings,
                                     transform_non_params=lambda _: replicated)

    def loss(self, factors, base, ids, labels, dropout_key=None):
        return objective.loss(factors, base, ids, labels, module=self.module, scale=self.config.lora.scale,
                              dropout_rate=self.config.lora.dropout, dropout_key=dropout_key, mesh=self.mesh,
                              rules=self.rules)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _train_step(program: Program, factors, opt_state, base, ids, labels, key):
    (value, (total, count)), grads = jax.value_and_grad(program.loss, has_aux=True)(factors, base, ids, labels, key)
    updates, opt_state = program.optimizer.update(grads, opt_state, factors)
    factors = optax.apply_updates(factors, updates)
    # Outputs placed exactly as the inputs were, so that the next step reuses this compilation.
    factors = jax.lax.with_sharding_constraint(factors, program.factor_shardings)
    opt_state = jax.lax.with_sharding_constraint(opt_state, program.state_shardings)
    return factors, opt_state, {"loss": value, "nll": total, "labels": count, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnums=0)
def _grads(program: Program, factors, base, ids, labels):
    value, grads = jax.value_and_grad(program.loss, has_aux=True)(factors, base, ids, labels)
    return grads, value


@functools.partial(jax.jit, static_argnums=0)
def _eval(program: Program, factors, base, ids, labels):
    return program.loss(factors, base, ids, labels)[1]


@functools.partial(jax.jit, static_argnums=0)
def _init_opt(program: Program, factors):
    return jax.lax.with_sharding_constraint(program.optimizer.init(factors), program.state_shardings)


class Trainer:
    """Training one model with one LoRA config: init, loss and gradients, a step, eval (jitted per `Program`)."""

    def __init__(self, model: QwenModel, config: TrainConfig, total_steps: int):
        self.model, self.config = model, config
        mesh = model.mesh if model.mesh is not None else sharding_lib.make_mesh(
            {"data": 1, "model": 1}, jax.devices()[:1])
        self.program = Program(dataclasses.replace(model.module, remat=config.remat), config, total_steps, mesh,
                               tuple(model.rules))
        self.targets = lora.select(model.config, config.lora)
        self.specs, self.schedule = self.program.specs, schedule(config, total_steps)
        self.batch_sharding = sharding_lib.named_sharding(mesh, self.program.rules, ("batch", "seq"))

    def init(self, seed: int) -> tuple[dict, optax.OptState]:
        factors = lora.init(seed, self.specs, self.program.mesh, self.program.rules)
        return factors, _init_opt(self.program, factors)

    def place(self, factors: dict) -> dict:
        """Host or device factors placed by the rules, float32."""
        return jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s), factors,
                                      self.program.factor_shardings)

    def place_batch(self, batch: data.Batch) -> tuple[jax.Array, jax.Array]:
        return (jax.device_put(batch.input_ids, self.batch_sharding),
                jax.device_put(batch.labels, self.batch_sharding))

    def step(self, factors, opt_state, batch: data.Batch, key: jax.Array):
        """One micro-batch: gradients, and the optimizer update every `grad_accum` calls. Donates its inputs."""
        return _train_step(self.program, factors, opt_state, self.model.params, *self.place_batch(batch), key)

    def grads(self, factors, batch: data.Batch) -> tuple[dict, tuple[jax.Array, tuple]]:
        """(gradients of the mean loss w.r.t. the factors, (loss, (nll sum, label count))); no dropout."""
        return _grads(self.program, factors, self.model.params, *self.place_batch(batch))

    def eval_loss(self, factors, batches) -> float:
        """Mean next-token loss over every kept label of `batches` (no dropout)."""
        total = count = 0.0
        for batch in batches:
            t, c = _eval(self.program, factors, self.model.params, *self.place_batch(batch))
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0)


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


@dataclasses.dataclass
class TrainResult:
    factors: dict
    lora: lora.LoraConfig
    adapter_dir: Path
    steps: int
    train_loss: float | None  # of the last optimizer step
    eval_loss: float | None


def _plan(config: TrainConfig, samples) -> int:
    per_epoch = len(data.epoch_batches(samples, config.batch_size, config.max_len, config.seed, 0))
    return config.max_steps or max(1, config.epochs * per_epoch // config.grad_accum)


def finetune(model: QwenModel, tokenizer: QwenTokenizer, train_path: str | Path, output_dir: str | Path,
             eval_path: str | Path | None = None, config: TrainConfig = TrainConfig(), progress: bool = True,
             base_model: str | None = None, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> TrainResult:
    """Train LoRA factors on `train_path` (Qwen's JSON format) and write the adapter to `output_dir`
    (`base_model`: the checkpoint path recorded in adapter_config.json).

    Resumes from `output_dir/checkpoints` when it holds one: a run killed at any point and started again with
    the same arguments reaches the parameters an uninterrupted run reaches.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    load = functools.partial(data.load_dataset, tokenizer=tokenizer, max_len=config.max_len,
                             on_error=config.on_error, on_overlong=config.on_overlong)
    train = load(train_path)
    evaluation = load(eval_path) if eval_path is not None else None
    problems = train.problems + (evaluation.problems if evaluation else [])
    (output / "data_problems.txt").write_text("".join(p + "\n" for p in problems))
    for line in problems[:20]:
        log(f"[finetune] {line}")
    if len(problems) > 20:
        log(f"[finetune] … {len(problems) - 20} more in {output / 'data_problems.txt'}")

    total_steps = _plan(config, train.samples)
    trainer = Trainer(model, config, total_steps)
    rng = jax.random.key(config.seed)
    factors, opt_state = trainer.init(config.seed)
    mngr = state.manager(output / "checkpoints")
    metrics_path = output / "metrics.jsonl"
    micro, epoch, index = 0, 0, 0
    restored = state.restore_latest(mngr, {"factors": factors, "opt_state": opt_state})
    if restored is not None:
        step, arrays, meta = restored
        factors, opt_state = arrays["factors"], arrays["opt_state"]
        micro, epoch, index = meta["micro_step"], meta["epoch"], meta["index"]
        rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        state.trim_metrics(metrics_path, step)
        log(f"[finetune] resumed from {output / 'checkpoints'} at step {step} (epoch {epoch}, batch {index})")
    else:
        metrics_path.unlink(missing_ok=True)
    log(f"[finetune] {len(train.samples)} samples ({train.num_tokens} tokens), {total_steps} optimizer steps of "
        f"{config.grad_accum} × {config.batch_size} rows; {lora.num_params(factors) / 1e6:.2f}M trained parameters "
        f"in {len(trainer.targets)} linears")

    pad = tokenizer.eod_id
    eval_batches = _one_pass(evaluation.samples, config, pad) if evaluation else []
    stream = data.batches_from(train.samples, config.batch_size, config.max_len, config.seed, pad, epoch, index)
    bar = tqdm(total=total_steps, initial=micro // config.grad_accum, disable=not progress, unit="step",
               dynamic_ncols=True)
    train_loss = eval_loss = None
    with metrics_path.open("a") as metrics:
        while micro < total_steps * config.grad_accum:
            start, nll, labels, tokens, norms = time.perf_counter(), 0.0, 0, 0, []
            for _ in range(config.grad_accum):
                epoch, index, batch = next(stream)
                factors, opt_state, out = trainer.step(factors, opt_state, batch, jax.random.fold_in(rng, micro + 1))
                micro += 1
                nll, labels = nll + float(out["nll"]), labels + int(out["labels"])
                tokens += batch.num_tokens
                norms.append(float(out["grad_norm"]))
            step = micro // config.grad_accum
            seconds = time.perf_counter() - start
            train_loss = nll / max(labels, 1)
            row = {"step": step, "loss": train_loss, "lr": float(trainer.schedule(step - 1)), "grad_norm": float(np.mean(norms)), "tokens": tokens,
                   "trained_labels": labels, "tokens_per_s": tokens / seconds, "seconds": seconds}
            if evaluation and config.eval_every and step % config.eval_every == 0:
                eval_loss = row["eval_loss"] = trainer.eval_loss(factors, eval_batches)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
            if step % config.save_every == 0 or micro == total_steps * config.grad_accum:
                meta = {"micro_step": micro, "epoch": epoch, "index": index + 1,
                        "rng": np.asarray(jax.random.key_data(rng)).tolist()}
                state.save(mngr, step, {"factors": factors, "opt_state": opt_state}, meta)
        if evaluation and (not config.eval_every or total_steps % config.eval_every):
            eval_loss = trainer.eval_loss(factors, eval_batches)
            metrics.write(json.dumps({"step": total_steps, "eval_loss": eval_loss}) + "\n")
    bar.close()
    adapters.save(output, factors, model.config, config.lora, base_model=base_model)
    return TrainResult(factors, config.lora, output, total_steps, train_loss, eval_loss)


def _one_pass(samples, config: TrainConfig, pad: int):
    """The batches of one epoch: every sample once."""
    stream = data.batches_from(samples, config.batch_size, config.max_len, config.seed, pad)
    count = len(data.epoch_batches(samples, config.batch_size, config.max_len, config.seed, 0))
    return [next(stream)[2] for _ in range(count)]
