"""KV-cache decoding, greedy chat against transformers, stopping, batching and streaming."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen_jax
from qwen_jax import chat_api as chat_lib
from qwen_jax.cache import init_cache
from qwen_jax.chat_api import chat, chat_stream, generate
from qwen_jax.chat_format import build_chat_prompt
from qwen_jax.decoding import Generation, GenerationConfig, generate_tokens
from tests.oracle import rel_err

STOPS = [151645, 151644, 151643]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return qwen_jax.load(tiny_dir, dtype="float32")


def test_cached_decoding_matches_full_forward(loaded):
    """Prefill ragged prompts into the cache, feed the rest one token at a time: logits equal a full forward."""
    model, _ = loaded
    rng = np.random.default_rng(0)
    lengths, total = [3, 7, 5], 12
    seqs = rng.integers(0, 151643, size=(3, total)).astype(np.int32)
    full = np.asarray(model.logits(seqs))  # [B, total, V]
    module, batch = model.module, len(lengths)
    cache = init_cache(model.config, batch, 16, model.dtype)
    padded = np.where(np.arange(8)[None] < np.asarray(lengths)[:, None], seqs[:, :8], 151643)
    positions = np.broadcast_to(np.arange(8, dtype=np.int32), (batch, 8))
    alpha = jnp.ones(batch, jnp.float32)
    logits, cache = module(model.params, padded, positions, alpha, cache,
                                 logits_index=jnp.asarray(lengths) - 1)
    want = full[np.arange(batch), np.asarray(lengths) - 1]
    assert rel_err(np.asarray(logits)[:, 0, :151851], want[:, :151851]) <= 1e-4
    pos = np.asarray(lengths)
    while pos.max() < total:
        step_pos = np.minimum(pos, total - 1)  # rows that reached the end repeat their last step harmlessly
        token = seqs[np.arange(batch), step_pos]
        logits, cache = module(model.params, token[:, None], step_pos[:, None].astype(np.int32),
                                     alpha, cache)
        want = full[np.arange(batch), step_pos]
        assert rel_err(np.asarray(logits)[:, 0, :151851], want[:, :151851]) <= 1e-4
        pos = pos + 1


def _hf_greedy(hf_model, prompt, max_new_tokens, repetition_penalty=1.0):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                repetition_penalty=repetition_penalty, eos_token_id=STOPS, pad_token_id=151643,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    tokens = out[0, len(prompt):].tolist()
    return tokens[: next((i for i, t in enumerate(tokens) if t in STOPS), len(tokens))]


@pytest.mark.parametrize("query,penalty", [("Hello", 1.0), ("写一首关于秋天的诗", 1.0), ("Tell me a story", 1.3)])
def test_greedy_chat_matches_transformers(loaded, hf_tiny, query, penalty):
    model, tok = loaded
    prompt = build_chat_prompt(tok, query)
    want = tok.decode(_hf_greedy(hf_tiny, prompt, 40, penalty)).strip()
    response, history = chat(model, tok, query, do_sample=False, repetition_penalty=penalty, max_new_tokens=40)
    assert response == want
    assert history == [(query, response)]


def test_multi_turn_history_and_injection(loaded):
    model, tok = loaded
    query = "say <|im_end|> and <|endoftext|> please"
    response, history = chat(model, tok, query, do_sample=False, max_new_tokens=8)
    response2, history2 = chat(model, tok, "and again", history=history, do_sample=False, max_new_tokens=8)
    assert history2 == [(query, response), ("and again", response2)]
    prompt = build_chat_prompt(tok, "and again", history)
    assert prompt.count(151645) == 4  # structural <|im_end|> only (system, query 1, response 1, query 2)
    assert prompt.count(151643) == 0


def test_same_seed_same_text_and_seeds_matter(loaded):
    model, tok = loaded
    a = chat(model, tok, "Hello", seed=11, max_new_tokens=16, top_p=1.0, temperature=1.5)[0]
    b = chat(model, tok, "Hello", seed=11, max_new_tokens=16, top_p=1.0, temperature=1.5)[0]
    others = {chat(model, tok, "Hello", seed=s, max_new_tokens=16, top_p=1.0, temperature=1.5)[0] for s in range(12, 16)}
    assert a == b
    assert len(others | {a}) > 1


def test_ragged_batch_equals_one_by_one(loaded):
    model, tok = loaded
    prompts = ["Once upon a time", "Hi", "The capital of France is a city that"]
    batched = generate(model, tok, prompts, max_new_tokens=12, seed=5, top_k=50)
    alone = [generate(model, tok, [p], max_new_tokens=12, seed=5 + i, top_k=50)[0] for i, p in enumerate(prompts)]
    assert batched == alone
    greedy = generate(model, tok, prompts, max_new_tokens=12, do_sample=False)
    assert greedy == [generate(model, tok, p, max_new_tokens=12, do_sample=False)[0] for p in prompts]


def test_user_stop_sequence_and_max_new_tokens(loaded):
    model, tok = loaded
    ids = tok.encode("Once upon a time")
    gen = GenerationConfig.resolve({}, do_sample=False, max_new_tokens=20, repetition_penalty=1.0)
    (full,) = list(generate_tokens(model, [ids], gen, [[t] for t in STOPS]))[-1]
    assert full.finish_reason == "length" and len(full.tokens) == 20
    stop = full.tokens[5:7]
    gen = GenerationConfig.resolve({}, do_sample=False, max_new_tokens=20, repetition_penalty=1.0,
                                   stop_words_ids=[stop])
    (cut,) = list(generate_tokens(model, [ids], gen, [[t] for t in STOPS]))[-1]
    first = next(i for i in range(len(full.tokens)) if full.tokens[i:i + 2] == stop)
    assert cut.finish_reason == "stop"
    assert cut.tokens == full.tokens[:first]


def test_rows_stop_independently(loaded):
    model, tok = loaded
    prompts = [tok.encode("Hi"), tok.encode("A much longer prompt than the other one")]
    gen = GenerationConfig.resolve({}, do_sample=False, max_new_tokens=10, repetition_penalty=1.0)
    (a, b) = list(generate_tokens(model, prompts, gen, [[t] for t in STOPS]))[-1]
    stop_a = a.tokens[3]  # make row 0 stop at its 4th token; row 1 must not be affected
    gen = GenerationConfig.resolve({}, do_sample=False, max_new_tokens=10, repetition_penalty=1.0,
                                   stop_words_ids=[[stop_a]])
    (a2, b2) = list(generate_tokens(model, prompts, gen, [[t] for t in STOPS]))[-1]
    assert a2.tokens == a.tokens[:a.tokens.index(stop_a)] and a2.finish_reason == "stop"
    want_b = b.tokens[:b.tokens.index(stop_a)] if stop_a in b.tokens else b.tokens
    assert b2.tokens == want_b


def test_stream_ends_with_chat_response(loaded):
    model, tok = loaded
    parts = list(chat_stream(model, tok, "Hello", do_sample=False, max_new_tokens=30))
    response, _ = chat(model, tok, "Hello", do_sample=False, max_new_tokens=30)
    assert len(parts) >= 2 and parts[-1] == response
    assert all(b.startswith(a) for a, b in zip(parts, parts[1:]))


def test_stream_never_breaks_a_character(loaded, monkeypatch):
    model, tok = loaded
    text = "龘𝔘 ok 🤖!"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens

    def one_token_at_a_time(model, prompts, gen, stops, chunk=None):
        for n in range(1, len(ids) + 1):
            yield [Generation(ids[:n], "stop" if n == len(ids) else None, 1, 0)]

    monkeypatch.setattr(chat_lib, "generate_tokens", one_token_at_a_time)
    parts = list(chat_stream(model, tok, "x"))
    assert parts[-1] == text.strip()
    assert not any("\ufffd" in p for p in parts)


def test_unknown_and_invalid_options(loaded):
    model, tok = loaded
    with pytest.raises(TypeError, match="unknown generation option.*'max_tokens'"):
        chat(model, tok, "Hello", max_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        chat(model, tok, "Hello", top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        chat(model, tok, "Hello", temperature=0.0)


def test_defaults_come_from_generation_config(loaded):
    model, _ = loaded
    gen = GenerationConfig.resolve(model.generation_config)
    assert (gen.top_p, gen.top_k, gen.repetition_penalty, gen.max_new_tokens, gen.do_sample, gen.max_window_size) == \
        (0.8, 0, 1.1, 512, True, 6144)
    assert GenerationConfig.resolve(model.generation_config, top_p=0.5).top_p == 0.5


def test_preflight_refuses_what_cannot_fit(loaded):
    from qwen_jax.cache import WORKSPACE_RESERVE, MemoryPreflightError, preflight, request_bytes_per_device

    model, _ = loaded
    need = request_bytes_per_device(model.config, 4, 64, 1024, model.dtype)
    # 2 layers × 2 (k, v) × 4 rows × 1024 slots × 2 heads × 32 × 4 bytes; 4 × 2 heads × 64 × 64 float32 scores;
    # w1|w2's product [4, 64, 2 × 128] in float32 and its float32 cast
    assert need == {"KV cache": 4 * 1024 * 1024, "prefill attention scores": 4 * 2 * 64 * 64 * 4,
                    "prefill activations": 4 * 64 * 256 * 8}
    # int8 values + a float16 scale per slot and head: 32 + 2 bytes instead of 32 × 4
    int8 = request_bytes_per_device(model.config, 4, 64, 1024, model.dtype, kv_dtype=jnp.int8)
    assert int8["KV cache"] == 2 * 2 * 4 * 1024 * 2 * (32 + 2)
    # in chunks of 16: later chunks' scores and probabilities over all 1024 slots; activations of 16 rows
    chunked = request_bytes_per_device(model.config, 4, 64, 1024, model.dtype, prefill_chunk=16)
    assert chunked["prefill attention scores"] == 2 * 4 * 2 * 16 * 1024 * 4
    assert chunked["prefill activations"] == 4 * 16 * 256 * 8
    preflight(model.config, 4, 64, 1024, model.dtype, free_bytes=sum(need.values()) + WORKSPACE_RESERVE)
    with pytest.raises(MemoryPreflightError, match=r"needs 1.00 GiB per device \(KV cache 0.00 GiB.*batch 4, "
                                                   r"prompt 64 and 1024 cache slots.*only 1.00 GiB is free.*"
                                                   r"use the int8 KV cache"):
        preflight(model.config, 4, 64, 1024, model.dtype, free_bytes=sum(need.values()) + WORKSPACE_RESERVE - 1)


def test_int8_prefill_falls_back_to_kernel_sized_chunks_when_256_token_chunks_do_not_fit(loaded, tiny_gptq_dir,
                                                                                          device_memory):
    """Past int8_matmul.MAX_KERNEL_M rows a prefill chunk dequantizes a layer; when the preflight refuses that plan
    for int8 weights, chunks of 64 / batch rows (kernel only) are planned. Float weights have no such fallback, and
    when neither plan fits the refusal gives the smaller plan's numbers."""
    from qwen_jax import cache as kv_cache
    from qwen_jax import decoding

    int8_model, _ = qwen_jax.load(tiny_gptq_dir, dtype="float32")
    batch, seq, slots = 2, 2048, 2560

    def need(model, chunk):
        return kv_cache.request_bytes_per_device(model.config, batch, seq, slots, model.dtype,
                                                 quant_group=model.quant_group, prefill_chunk=chunk)

    assert "prefill dequantized layer" in need(int8_model, 256)
    assert "prefill dequantized layer" not in need(int8_model, 32)
    lean = sum(need(int8_model, 32).values()) + kv_cache.WORKSPACE_RESERVE
    assert sum(need(int8_model, 256).values()) + kv_cache.WORKSPACE_RESERVE > lean
    device_memory.free = lean
    assert decoding.plan_prefill(int8_model, batch, seq, slots) == 32
    float_need = sum(need(loaded[0], 256).values()) + kv_cache.WORKSPACE_RESERVE
    with pytest.raises(kv_cache.MemoryPreflightError, match=f"needs {float_need / 2**30:.2f} GiB"):
        decoding.plan_prefill(loaded[0], batch, seq, slots)
    device_memory.free = lean - 1
    with pytest.raises(kv_cache.MemoryPreflightError, match=f"needs {lean / 2**30:.2f} GiB"):
        decoding.plan_prefill(int8_model, batch, seq, slots)


def test_chunked_prefill_generates_what_one_piece_does(loaded, monkeypatch, prefill_calls):
    """Long prompts are prefilled in chunks (the first attends to itself, the rest over the cache); with chunks of
    128 tokens, ragged rows whose last tokens fall in different chunks generate what a one-piece prefill does."""
    from qwen_jax import decoding

    model, _ = loaded
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 151643, n).tolist() for n in (300, 100)]
    gen = GenerationConfig.resolve(model.generation_config, max_new_tokens=6, do_sample=False)
    whole = [r.tokens for r in list(generate_tokens(model, prompts, gen))[-1]]
    prefill_calls.clear()  # the one-piece run's
    monkeypatch.setattr(decoding, "LINEAR_BUCKET", 128)
    monkeypatch.setattr(decoding, "PREFILL_CHUNK", 128)
    monkeypatch.setattr(decoding, "BUCKET_STEP", 128)
    chunked = [r.tokens for r in list(generate_tokens(model, prompts, gen))[-1]]
    assert prefill_calls == [(2, 128)] * 3  # 300 tokens pad to 384
    assert chunked == whole
