"""Training through the CLI killed with SIGKILL, then resumed, reaches the parameters of an uninterrupted run; the
metrics log holds every step once; the adapter is written at the end."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import qwen_jax
from qwen_jax.finetune import adapters, data, lora, train
from qwen_jax.tokenizer import QwenTokenizer

STEPS = 8
CONFIG = train.TrainConfig(lora=lora.LoraConfig(r=4, alpha=8, dropout=0.1), learning_rate=1e-2, batch_size=2,
                           grad_accum=2, max_steps=STEPS, max_len=64, save_every=2, eval_every=4, seed=3)
FLAGS = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lr", "1e-2", "--batch-size", "2",
         "--grad-accum", "2", "--max-steps", str(STEPS), "--max-len", "64", "--save-every", "2", "--eval-every", "4",
         "--seed", "3", "--dtype", "float32", "--no-progress"]


def _sample(i):
    words = "你好 world tokens <|im_end|> JAX 🤖 answer".split()
    question = " ".join(words[(i + k) % len(words)] for k in range(6 + i % 5))
    return {"id": f"s{i}", "conversations": [{"from": "user", "value": question},
                                             {"from": "assistant", "value": f"reply {i} " + words[i % len(words)]}]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-data")
    (root / "train.json").write_text(json.dumps([_sample(i) for i in range(20)] + [{"id": "bad", "conversations": []}]))
    (root / "eval.json").write_text(json.dumps([_sample(100 + i) for i in range(3)]))
    tok = QwenTokenizer.default()
    lengths = [len(s.input_ids) for s in data.load_dataset(root / "train.json", tok, 64).samples]
    assert all(data.bucket_length(n, 64) == 64 for n in lengths), lengths  # one shape: one compilation
    return root


def _metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_dir, dataset):
    model, tok = qwen_jax.load(tiny_dir, dtype="float32")
    reference = train.finetune(model, tok, dataset / "train.json", tmp_path / "reference",
                               eval_path=dataset / "eval.json", config=CONFIG, progress=False)
    assert "'bad'" in (tmp_path / "reference" / "data_problems.txt").read_text()  # reported, not trained on

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qwen_jax.cli", "finetune", "--model", str(tiny_dir), "--data",
           str(dataset / "train.json"), "--eval", str(dataset / "eval.json"), "--output", str(out), *FLAGS]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | {"CI": ""})
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        log = out / "metrics.jsonl"
        if log.is_file() and any(json.loads(line)["step"] >= 3 for line in log.read_text().splitlines()[:-1]):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()[-2000:]
    assert not (out / adapters.WEIGHTS_FILE).exists()  # killed before the end

    resumed = train.finetune(model, tok, dataset / "train.json", out, eval_path=dataset / "eval.json", config=CONFIG,
                             progress=False)
    for want, got in zip(jax.tree_util.tree_leaves(reference.factors), jax.tree_util.tree_leaves(resumed.factors)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)  # the same float32 program
    rows, want_rows = _metrics(out), _metrics(tmp_path / "reference")
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want_rows], rtol=1e-6)
    assert [("eval_loss" in r) for r in rows] == [s % 4 == 0 for s in range(1, STEPS + 1)]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns

    _, saved = adapters.load(out, model.config)
    np.testing.assert_allclose(saved["layers"]["attn"]["c_attn"]["b"],
                               np.asarray(resumed.factors["layers"]["attn"]["c_attn"]["b"]), rtol=1e-6)
