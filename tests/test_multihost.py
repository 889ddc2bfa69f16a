"""Multi-controller: 2 processes on localhost CPUs (4 devices each, gloo) give the tokens of one process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import qwen_jax
from qwen_jax import sharding, testing
from qwen_jax.config import preset
from qwen_jax.decoding import GenerationConfig, generate_tokens

CONFIG = preset("tiny").replace(hidden_size=128, num_attention_heads=8, kv_channels=16, intermediate_size=512)
STRATEGY = "dp_tp"  # 2×4 mesh: tensor parallel inside each process, the batch split across the two
WORKER = Path(__file__).parent / "multihost" / "worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(jax.device_count() < 8, reason="the single-process reference needs 8 devices")
def test_two_processes_match_one(tmp_path):
    checkpoint = testing.write_float_checkpoint(tmp_path / "ckpt", CONFIG, seed=4)

    port, outs = _free_port(), [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), f"127.0.0.1:{port}", "2", str(i), str(checkpoint),
                               STRATEGY, str(outs[i])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    assert [(r["process"], r["devices"], r["local"]) for r in results] == [(0, 8, 4), (1, 8, 4)]

    mesh = sharding.make_mesh({"data": 2, "model": 4})
    model, _ = qwen_jax.load(checkpoint, dtype="float32", mesh=mesh, strategy=STRATEGY)
    ids = np.random.default_rng(0).integers(0, 151851, (8, 12))
    logits = np.asarray(model.logits(ids))[..., :151851]
    gen = GenerationConfig.resolve({}, do_sample=False, max_new_tokens=6, repetition_penalty=1.0)
    tokens = [g.tokens for g in list(generate_tokens(model, [ids[i, : 3 + i].tolist() for i in range(8)], gen))[-1]]
    for r in results:
        assert r["tokens"] == tokens
        assert r["logits_argmax"] == logits.argmax(-1).tolist()
        assert abs(r["logits_sum"] - float(np.abs(logits).sum())) <= 1e-4 * float(np.abs(logits).sum())
