"""One process of a multi-controller run on localhost CPUs (gloo collectives); launched by tests/test_multihost.py.

    python tests/multihost/worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT STRATEGY OUT_JSON
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # 4 local devices per process

import jax  # noqa: E402

coordinator, num_processes, process_id, checkpoint, strategy, out = sys.argv[1:]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator, int(num_processes), int(process_id))

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import qwen_jax  # noqa: E402
from qwen_jax import sharding  # noqa: E402
from qwen_jax.decoding import GenerationConfig, generate_tokens  # noqa: E402

mesh = sharding.make_mesh({"data": 2, "model": 4}, jax.devices())  # all 8 devices of both processes
model, _ = qwen_jax.load(checkpoint, dtype="float32", mesh=mesh, strategy=strategy)
ids = np.random.default_rng(0).integers(0, 151851, (8, 12))
logits = sharding.to_host(model.logits(ids))
gen = GenerationConfig.resolve({}, do_sample=False, max_new_tokens=6, repetition_penalty=1.0)
tokens = [g.tokens for g in list(generate_tokens(model, [ids[i, : 3 + i].tolist() for i in range(8)], gen))[-1]]
# Both processes finish their work before either starts the shutdown barrier (which has a deadline).
multihost_utils.sync_global_devices("results ready")
with open(out, "w") as f:
    json.dump({"process": jax.process_index(), "devices": jax.device_count(), "local": jax.local_device_count(),
               "logits_argmax": logits[..., :151851].argmax(-1).tolist(), "logits_sum": float(np.abs(logits[..., :151851]).sum()),
               "tokens": tokens}, f)
jax.distributed.shutdown()
