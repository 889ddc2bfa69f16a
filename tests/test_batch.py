"""Continuous batching (qwen_jax.batch): equality with one-by-one generation, no recompiles, exactly-once jobs."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qwen_jax
from qwen_jax import batch as batch_lib
from qwen_jax.chat_format import chat_stop_ids
from qwen_jax.decoding import GenerationConfig, _decode, generate_tokens

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return qwen_jax.load(tiny_dir, dtype="float32")


def _prompts(tok, n):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    return [tok.encode(" ".join(words[: 1 + (i * 5) % len(words)]) * (1 + i % 3)) for i in range(n)]


def _alone(model, prompt, gen, seed, stops):
    """The reference: the prompt generated alone with its own seed (row 0 of a batch of one uses `seed`)."""
    (result,) = list(generate_tokens(model, [prompt], dataclasses.replace(gen, seed=seed), stops))[-1]
    return result.tokens, result.finish_reason


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_engine_equals_one_by_one(loaded, do_sample):
    """More requests than slots, ragged lengths, per-request options: each equals generate_tokens alone."""
    model, tok = loaded
    gen = GenerationConfig.resolve(model.generation_config, max_new_tokens=8, do_sample=do_sample, top_k=50,
                                   temperature=1.3)
    stops = [[t] for t in chat_stop_ids(tok)]
    prompts = _prompts(tok, 7)
    requests = [batch_lib.Request(i, p, seed=100 + i, options={"max_new_tokens": 8 - i} if i % 3 == 0 else {})
                for i, p in enumerate(prompts)]
    engine = batch_lib.Engine(model, gen, max_prompt_len=max(map(len, prompts)), stop_sequences=stops, num_slots=3,
                              chunk=4, max_group=2)
    results = {r.id: r for r in engine.run(requests)}
    assert sorted(results) == list(range(7))
    for r in requests:
        want_gen = dataclasses.replace(gen, **r.options)
        tokens, reason = _alone(model, r.prompt, want_gen, r.seed, stops)
        assert results[r.id].tokens == tokens, r.id
        assert results[r.id].finish_reason == reason
        assert results[r.id].prompt_tokens == len(r.prompt)
    assert 0 < engine.stats.slot_occupancy <= 1
    assert engine.stats.prefill_calls >= 3


def test_decode_step_never_recompiles(loaded):
    """Two jobs of the same shapes with different requests, options and seeds: _decode compiles at most once."""
    model, tok = loaded
    gen = GenerationConfig.resolve(model.generation_config, max_new_tokens=8, do_sample=True, top_p=1.0)
    stops = [[t] for t in chat_stop_ids(tok)]
    prompts = _prompts(tok, 9)

    def job(seed, options):
        reqs = [batch_lib.Request(i, p, seed=seed + i, options=options) for i, p in enumerate(prompts)]
        engine = batch_lib.Engine(model, gen, max_prompt_len=64, stop_sequences=stops, num_slots=4, chunk=3)
        return list(engine.run(reqs)), engine

    job(0, {})
    before = _decode._cache_size()
    results, engine = job(7, {"temperature": 0.7, "do_sample": False, "max_new_tokens": 5})
    assert _decode._cache_size() == before
    assert len(results) == 9 and engine.stats.decode_calls > 2


def _write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def _read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


def test_job_formats_errors_and_chat_equivalence(loaded, tmp_path):
    model, tok = loaded
    lines = [
        {"id": "raw", "prompt": "def f(x):"},
        {"id": "q", "query": "Hello", "history": [["Hi", "Hey there"]], "seed": 5},
        {"id": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        '{"id": "broken", "prompt": ',
        {"prompt": "no id"},
        {"id": "raw", "prompt": "duplicate"},
        {"id": "long", "prompt": "word " * 300},
        {"id": "badmsg", "messages": [{"role": "assistant", "content": "x"}]},
        {"id": 7, "prompt": "an integer id", "max_new_tokens": 4, "do_sample": False},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(src, lines)
    summary = batch_lib.run_job(model, tok, src, out, seed=3, max_new_tokens=10, max_prompt_tokens=128,
                                num_slots=2, progress=False)
    rows = {r["id"]: r for r in _read_jsonl(out)}
    assert set(rows) == {"raw", "q", "m", 7} and summary["completed"] == 4
    errors = _read_jsonl(str(out) + ".errors.jsonl")
    reasons = {e["line"]: e["reason"] for e in errors}
    assert sorted(reasons) == [4, 5, 6, 7, 8]
    assert "invalid JSON" in reasons[4] and "missing id" in reasons[5] and "duplicate" in reasons[6]
    assert "over-long" in reasons[7] and "alternate" in reasons[8]
    # seeds: the line's own, else job seed + stable hash of the id
    assert rows["q"]["seed"] == 5 and rows["raw"]["seed"] == (3 + batch_lib.stable_hash("raw")) % 2**32
    # a chat line equals chat() with the same seed
    want, _ = qwen_jax.chat(model, tok, "Hello", history=[("Hi", "Hey there")], seed=5, max_new_tokens=10)
    assert rows["q"]["completion"] == want
    want_m, _ = qwen_jax.chat(model, tok, "Hi", system="Be brief.", seed=rows["m"]["seed"], max_new_tokens=10)
    assert rows["m"]["completion"] == want_m
    want_raw = qwen_jax.generate(model, tok, ["def f(x):"], seed=rows["raw"]["seed"], max_new_tokens=10)[0]
    assert rows["raw"]["completion"] == want_raw
    assert rows[7]["completion_tokens"] <= 4
    # a rerun does nothing and reports nothing twice
    again = batch_lib.run_job(model, tok, src, out, seed=3, max_new_tokens=10, max_prompt_tokens=128, progress=False)
    assert again["completed"] == 0 and len(_read_jsonl(out)) == 4
    assert len(_read_jsonl(str(out) + ".errors.jsonl")) == 5


def test_torn_last_line_is_truncated_and_redone(loaded, tmp_path):
    model, tok = loaded
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(src, [{"id": i, "prompt": f"number {i}"} for i in range(4)])
    kw = dict(seed=1, max_new_tokens=6, num_slots=2, progress=False)
    batch_lib.run_job(model, tok, src, tmp_path / "ref.jsonl", **kw)
    ref = {r["id"]: r for r in _read_jsonl(tmp_path / "ref.jsonl")}
    first = (tmp_path / "ref.jsonl").read_text().splitlines()[0]
    out.write_text(first + "\n" + first[: len(first) // 2])  # one whole line, then a torn one
    summary = batch_lib.run_job(model, tok, src, out, **kw)
    assert summary["already_done"] == 1 and summary["completed"] == 3
    rows = _read_jsonl(out)
    assert sorted(r["id"] for r in rows) == [0, 1, 2, 3]
    assert {r["id"]: r for r in rows} == ref


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jit")


def _cli(tiny_dir, src, out, jit_cache, *extra):
    """The batch CLI as a subprocess command and environment: one CPU device, and a persistent compilation cache
    shared by the subprocesses of this module so that only the first one compiles (test time)."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(jit_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    cmd = [sys.executable, "-m", "qwen_jax.cli", "batch", "--model", str(tiny_dir), "--dtype", "float32",
           "--input", str(src), "--output", str(out), "--seed", "9", "--max-new-tokens", "8", "--top-p", "1.0",
           "--slots", "2", "--chunk", "2", "--max-group", "1", "--no-progress", *extra]
    return cmd, env


def test_two_replica_processes_split_the_input_without_overlap(loaded, tiny_dir, tmp_path, jit_cache):
    """Two processes with --num-replicas 2 take disjoint shares whose union is the single-process result."""
    model, tok = loaded
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{"id": f"r{i}", "query": f"Tell me about the number {i}"} for i in range(10)])
    procs = []
    for k in range(2):
        cmd, env = _cli(tiny_dir, src, tmp_path / f"part{k}.jsonl", jit_cache, "--num-replicas", "2",
                        "--replica-index", str(k))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT))
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    batch_lib.run_job(model, tok, src, tmp_path / "all.jsonl", seed=9, max_new_tokens=8, top_p=1.0, num_slots=2,
                      chunk=2, max_group=1, progress=False)
    parts = [_read_jsonl(tmp_path / f"part{k}.jsonl") for k in range(2)]
    assert all(parts) and sorted(r["id"] for p in parts for r in p) == sorted(f"r{i}" for i in range(10))
    assert {r["id"]: r for p in parts for r in p} == {r["id"]: r for r in _read_jsonl(tmp_path / "all.jsonl")}


def test_sigkill_midway_then_resume_is_exactly_once(loaded, tiny_dir, tmp_path, jit_cache):
    """Kill -9 the CLI job after a few lines, restart it: every id once, texts as an uninterrupted run."""
    src = tmp_path / "in.jsonl"
    n = 24
    _write_jsonl(src, [{"id": f"p{i}", "query": f"Tell me about the number {i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    cmd, env = _cli(tiny_dir, src, out, jit_cache)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 3 <= written < n
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    ref = tmp_path / "ref.jsonl"  # uninterrupted, in this process: the same checkpoint, dtype and options
    model, tok = loaded
    batch_lib.run_job(model, tok, src, ref, seed=9, max_new_tokens=8, top_p=1.0, num_slots=2, chunk=2, max_group=1,
                      progress=False)
    rows = _read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(n))  # each exactly once
    assert {r["id"]: r for r in rows} == {r["id"]: r for r in _read_jsonl(ref)}


def test_engine_preflight_counts_its_slot_cache_beside_the_largest_prefill_group(loaded, device_memory):
    """The engine holds its slot cache while a prefill group (max_group rows at the longest bucketed prompt) builds
    its own: both must fit before anything is allocated; one byte short, `run` refuses with the slot cache named."""
    from qwen_jax import cache as kv_cache

    model, tok = loaded
    gen = GenerationConfig.resolve(model.generation_config, max_new_tokens=6, do_sample=False)
    engine = batch_lib.Engine(model, gen, max_prompt_len=40, num_slots=4, max_group=2)
    group = kv_cache.request_bytes_per_device(model.config, 2, 64, engine.max_len, model.dtype)
    slots = kv_cache.cache_bytes(model.config, 4, engine.max_len, model.dtype)
    fits = sum(group.values()) + slots + kv_cache.WORKSPACE_RESERVE
    device_memory.free = fits
    engine.preflight()
    assert engine.prefill_tokens is None  # float weights: one-piece prefills as without a preflight
    device_memory.free = fits - 1
    with pytest.raises(kv_cache.MemoryPreflightError, match=rf"engine KV cache \(4 slots\) {slots / 2**30:.2f} GiB"):
        list(engine.run([batch_lib.Request(0, tok.encode("hello"), 0)]))


def test_engine_with_int8_weights_prefills_in_kernel_sized_chunks_when_memory_asks(tiny_gptq_dir, device_memory,
                                                                                    prefill_calls):
    """When only kernel-sized chunks fit (decoding.plan_prefill), 64-token prompt buckets are prefilled 32 tokens
    at a time (2 rows × 32 = int8_matmul.MAX_KERNEL_M), and every request gets the tokens of a one-piece prefill."""
    from qwen_jax import cache as kv_cache

    model, tok = qwen_jax.load(tiny_gptq_dir, dtype="float32")
    gen = GenerationConfig.resolve(model.generation_config, max_new_tokens=5, do_sample=False)
    prompts = [tok.encode("the quick brown fox jumps" * n)[:40] for n in (1, 8, 3)]

    def run():
        engine = batch_lib.Engine(model, gen, max_prompt_len=40, num_slots=2, max_group=2)
        results = {r.id: r.tokens for r in engine.run([batch_lib.Request(i, p, 0) for i, p in enumerate(prompts)])}
        return engine.prefill_tokens, results

    one_piece, want = run()
    need = kv_cache.request_bytes_per_device(model.config, 2, 64, 64, model.dtype, quant_group=model.quant_group,
                                             prefill_chunk=32)
    device_memory.free = (sum(need.values()) + kv_cache.cache_bytes(model.config, 2, 64, model.dtype)
                          + kv_cache.WORKSPACE_RESERVE)
    prefill_calls.clear()  # the one-piece run's
    chunked, got = run()
    assert (one_piece, chunked) == (None, 32) and (2, 32) in prefill_calls and (2, 64) not in prefill_calls
    assert got == want


def test_cli_batch_replicas_default_to_the_processes_of_a_distributed_run(monkeypatch, tmp_path):
    """`qwen-jax batch --distributed`: jax.distributed.initialize gets the flags (None where JAX should detect the
    cluster), and each process serves the share of its process index among the run's processes."""
    import jax

    from qwen_jax import batch as batch_lib
    from qwen_jax import cli

    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.setdefault("init", kw))
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    monkeypatch.setattr(cli, "_load", lambda args: (None, None))
    monkeypatch.setattr(batch_lib, "run_job", lambda *a, **kw: seen.setdefault("job", kw) and {})
    argv = ["batch", "--distributed", "--coordinator", "host0:1234", "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out.jsonl"), "--no-progress"]
    assert cli.main(argv) == 0
    assert seen["init"] == {"coordinator_address": "host0:1234", "num_processes": None, "process_id": None}
    assert (seen["job"]["num_replicas"], seen["job"]["replica_index"]) == (4, 3)
    seen.clear()
    cli.main(["batch", "--input", "i", "--output", "o", "--num-replicas", "2", "--replica-index", "0"])
    assert "init" not in seen and (seen["job"]["num_replicas"], seen["job"]["replica_index"]) == (2, 0)
