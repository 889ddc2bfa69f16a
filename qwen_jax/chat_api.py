"""The public generation API: `chat`, `chat_stream` (as the Qwen model card's), and batched `generate`."""

from __future__ import annotations

import codecs
from typing import Iterator, Sequence

from qwen_jax.chat_format import DEFAULT_SYSTEM, History, build_chat_prompt, chat_stop_ids
from qwen_jax.decoding import GenerationConfig, generate_tokens
from qwen_jax.model import QwenModel
from qwen_jax.tokenizer import QwenTokenizer

STREAM_CHUNK = 8  # decode steps per device call while streaming: fewer host round trips vs. latency


def _chat_request(model, tokenizer, query, history, system, gen_kwargs):
    gen = GenerationConfig.resolve(model.generation_config, **gen_kwargs)
    prompt = build_chat_prompt(tokenizer, query, history, system=system, max_window_size=gen.max_window_size)
    stops = [[t] for t in chat_stop_ids(tokenizer)]
    return gen, prompt, stops


def chat(model: QwenModel, tokenizer: QwenTokenizer, query: str, history: History | None = None,
         system: str = DEFAULT_SYSTEM, **gen) -> tuple[str, list[tuple[str, str]]]:
    """One chat turn: returns (response, history + [(query, response)]). Generation options as `generate`."""
    gen_config, prompt, stops = _chat_request(model, tokenizer, query, history, system, gen)
    (result,) = list(generate_tokens(model, [prompt], gen_config, stops))[-1]
    response = tokenizer.decode(result.tokens).strip()
    return response, [*(history or []), (query, response)]


def chat_stream(model: QwenModel, tokenizer: QwenTokenizer, query: str, history: History | None = None,
                system: str = DEFAULT_SYSTEM, **gen) -> Iterator[str]:
    """Yield the cumulative response text as it grows; never a broken UTF-8 character. History is unchanged."""
    gen_config, prompt, stops = _chat_request(model, tokenizer, query, history, system, gen)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted, shown = "", 0, None
    for (result,) in generate_tokens(model, [prompt], gen_config, stops, chunk=STREAM_CHUNK):
        # An incremental decoder holds back the bytes of a character split across tokens until it completes.
        text += decoder.decode(tokenizer.decode_bytes(result.tokens[emitted:]), final=result.finish_reason is not None)
        emitted = len(result.tokens)
        if text.strip() != shown:
            shown = text.strip()
            yield shown


def generate(model: QwenModel, tokenizer: QwenTokenizer, prompts: Sequence[str] | str, **gen) -> list[str]:
    """Complete a batch of raw prompts (no chat template), each row stopping on its own.

    Options (defaults from the checkpoint's generation_config.json): max_new_tokens, do_sample, temperature,
    top_k, top_p, repetition_penalty, seed (row i uses seed + i), stop_words_ids (extra stop sequences of ids;
    <|endoftext|>, <|im_start|> and <|im_end|> always stop), max_window_size (chat only).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    gen_config = GenerationConfig.resolve(model.generation_config, **gen)
    ids = [tokenizer.encode(p) for p in prompts]
    stops = [[t] for t in chat_stop_ids(tokenizer)]
    results = list(generate_tokens(model, ids, gen_config, stops))[-1]
    return [tokenizer.decode(r.tokens) for r in results]
