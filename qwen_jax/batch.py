"""Offline batch generation: a continuous-batching engine and resumable, exactly-once JSONL jobs.

The engine keeps S slots in one static-shape KV cache [layers, S, heads, max_len, head_dim]. Waiting requests
are sorted longest-first and prefilled in small groups (batch and prompt length bucketed as `decoding.bucket`, so a
job compiles a handful of prefill programs); each group's DecodeState rows are copied into free slots
(`decoding.insert_rows`), then `decoding._decode` runs a chunk of steps for all slots at once. Finished rows are
harvested after every chunk and their slots refilled. Sampling knobs, seeds, limits and max_new_tokens are per-slot
traced arrays, so the decode step compiles once per job whatever the requests ask for.

A request samples exactly the tokens it would alone (`generate_tokens` with its own seed): randomness is keyed on
(seed, output index), and rows of a batch never interact.

A job (`run_job`) reads JSONL requests, skips ids already in the output file, and appends each result as one
write() of a whole line, flushed and fsync'ed: a crash loses at most the in-flight requests, and a torn last line
(a crash inside write) is truncated away on restart.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from qwen_jax import sampling
from qwen_jax import sharding as sharding_lib
from qwen_jax.chat_format import DEFAULT_SYSTEM, build_chat_prompt, chat_stop_ids
from qwen_jax.decoding import (GenerationConfig, _decode, _prefill, _stop_table, bucket, idle_state, insert_rows,
                               plan_prefill, prefill_chunk)

PAD_ID = 151643  # <|endoftext|>: pads prefill rows; never attended
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
REQUEST_OPTIONS = ("max_new_tokens", *SAMPLING_FIELDS)  # per-request overrides a JSONL line may carry


# --- the engine ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """One generation request. `options` overrides the engine's GenerationConfig (any of REQUEST_OPTIONS)."""

    id: Any
    prompt: list[int]  # token ids
    seed: int
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    id: Any
    tokens: list[int]  # output ids, the stop sequence excluded
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    seed: int


@dataclasses.dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0  # real prompt tokens prefilled
    prefill_tokens: int = 0  # padded tokens prefilled (group rows x bucketed length)
    generated_tokens: int = 0
    decode_steps: int = 0
    slot_steps: int = 0  # decode steps x slots
    active_slot_steps: int = 0  # slot-steps that produced a token
    prefill_calls: int = 0
    decode_calls: int = 0

    @property
    def slot_occupancy(self) -> float:
        """Share of decode slot-steps that produced a token (1 = every slot busy at every step)."""
        return self.active_slot_steps / max(self.slot_steps, 1)

    @property
    def prefill_padding(self) -> float:
        """Share of prefilled tokens that were padding."""
        return 1 - self.prompt_tokens / max(self.prefill_tokens, 1)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "slot_occupancy": round(self.slot_occupancy, 4),
                "prefill_padding": round(self.prefill_padding, 4)}


class Engine:
    """Continuous batching over `num_slots` slots. `run(requests)` yields a Result per request as each finishes.

    max_prompt_len / max_new_tokens fix the cache (max_len = bucket(max_prompt_len + max_new_tokens)) and the
    output buffer; requests may ask for fewer new tokens, never more. `chunk` decode steps run per device call
    between harvests; `max_group` bounds how many requests one prefill call admits.
    """

    def __init__(self, model, gen: GenerationConfig, max_prompt_len: int, stop_sequences: Sequence[Sequence[int]] = (),
                 num_slots: int = 16, chunk: int = 8, max_group: int = 8):
        if num_slots < 1 or chunk < 1 or max_group < 1:
            raise ValueError(f"num_slots, chunk and max_group must be >= 1, got {num_slots}, {chunk}, {max_group}")
        self.model, self.gen = model, gen
        self.num_slots, self.chunk, self.max_group = num_slots, chunk, max_group
        self.max_prompt_len = int(max_prompt_len)
        self.buffer_len = bucket(gen.max_new_tokens)  # as generate_tokens: the same programs' shapes
        self.max_len = bucket(max(bucket(self.max_prompt_len), self.max_prompt_len + gen.max_new_tokens))
        self.stops = jnp.asarray(_stop_table([*stop_sequences, *gen.stop_words_ids]))
        self.stats = EngineStats()
        self.prefill_tokens: int | None = None  # prefill chunk when memory asks for kernel-sized ones (`preflight`)

    def preflight(self) -> None:
        """Refuse (cache.MemoryPreflightError) an engine whose slot cache and largest prefill group cannot fit
        together, before anything is allocated; plan the prefill chunk (decoding.plan_prefill) for them."""
        rows, seq = bucket_pow2(min(self.max_group, self.num_slots)), bucket(self.max_prompt_len)
        resident = {f"engine KV cache ({self.num_slots} slots)":
                    self.model.cache_bytes_per_device(self.num_slots, self.max_len)}
        planned = plan_prefill(self.model, rows, seq, self.max_len, resident)
        self.prefill_tokens = None if planned == prefill_chunk(seq) else planned

    # Per-request values as host arrays; one row per request.
    def _row_values(self, requests: Sequence[Request]) -> dict[str, np.ndarray]:
        def value(r, name):
            return r.options.get(name, getattr(self.gen, name))

        values = {name: np.asarray([value(r, name) for r in requests]) for name in REQUEST_OPTIONS}
        values["seed"] = np.asarray([r.seed % 2**32 for r in requests], np.uint32)
        return values

    @staticmethod
    def _sampling(values: dict[str, np.ndarray]) -> sampling.SamplingParams:
        return sampling.SamplingParams(
            do_sample=jnp.asarray(values["do_sample"], bool), temperature=jnp.asarray(values["temperature"], jnp.float32),
            top_k=jnp.asarray(values["top_k"], jnp.int32), top_p=jnp.asarray(values["top_p"], jnp.float32),
            repetition_penalty=jnp.asarray(values["repetition_penalty"], jnp.float32),
            seed=jnp.asarray(values["seed"], jnp.uint32))

    def validate(self, request: Request) -> None:
        """Raise ValueError if the engine cannot serve `request` (empty, too long, bad options)."""
        if not request.prompt:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if len(request.prompt) > self.max_prompt_len:
            raise ValueError(f"prompt has {len(request.prompt)} tokens, more than max_prompt_len={self.max_prompt_len}")
        check_options(self.gen, request.options)

    def _prefill_group(self, group: Sequence[Request]):
        """Prefill `group` as one batch of bucket(len(group)) rows at the bucketed longest prompt length."""
        rows, seq = bucket_pow2(len(group)), bucket(max(len(r.prompt) for r in group))
        ids = np.full((rows, seq), PAD_ID, np.int32)  # [G, S]
        lengths = np.ones(rows, np.int32)  # padding rows: a one-token prompt, dropped at insertion
        for i, r in enumerate(group):
            ids[i, :len(r.prompt)] = r.prompt
            lengths[i] = len(r.prompt)
        values = self._row_values(group)
        padded = {k: np.concatenate([v, np.repeat(v[:1], rows - len(group))]) for k, v in values.items()}
        config = self.model.config
        alpha = jnp.asarray([config.ntk_alpha(int(n)) for n in lengths], jnp.float32)
        cache = self.model.new_cache(rows, self.max_len)
        state = _prefill(self.model.module, self.model.params, jnp.asarray(ids), jnp.asarray(lengths), alpha, cache,
                         self._sampling(padded), self.stops, jnp.asarray(padded["max_new_tokens"], jnp.int32),
                         self.buffer_len, **self.model.placement,
                         chunk=None if self.prefill_tokens is None else min(self.prefill_tokens, seq))
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += rows * seq
        self.stats.prompt_tokens += int(sum(len(r.prompt) for r in group))
        return state, rows

    def run(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Yield one Result per request, in completion order. Requests are validated first (ValueError), then the
        engine's memory (`preflight`)."""
        waiting = sorted(requests, key=lambda r: -len(r.prompt))  # longest first: groups of similar length
        for r in waiting:
            self.validate(r)
        self.preflight()
        waiting = collections.deque(waiting)
        num_slots, model = self.num_slots, self.model
        cache = model.new_cache(num_slots, self.max_len)
        state = idle_state(cache, num_slots, self.buffer_len, model.config.vocab_size)
        slot_values = self._row_values([Request(None, [0], 0)] * num_slots)  # [S] per field, host side
        slot_values["max_new_tokens"][:] = 1
        running: dict[int, Request] = {}
        free = list(range(num_slots))
        steps = 0
        num_prev = np.ones(num_slots, np.int64)  # host copy of num_generated (no extra device sync per chunk)
        while waiting or running:
            while free and waiting:  # admit into every free slot before decoding on
                group = [waiting.popleft() for _ in range(min(self.max_group, len(free), len(waiting)))]
                group_state, rows = self._prefill_group(group)
                slots = [free.pop(0) for _ in group]
                padded_slots = np.full(rows, num_slots, np.int32)  # out of range: padding rows are dropped
                padded_slots[:len(slots)] = slots
                state = insert_rows(state, group_state, jnp.asarray(padded_slots))
                values = self._row_values(group)
                for name in slot_values:
                    slot_values[name][slots] = values[name]
                running.update(zip(slots, group))
                num_prev[slots] = 1  # prefill made each row's first token
                self.stats.requests += len(group)
            state = _decode(model.module, model.params, state, self._sampling(slot_values), self.stops,
                            jnp.asarray(slot_values["max_new_tokens"], jnp.int32), jnp.asarray(steps + self.chunk),
                            **model.placement)
            self.stats.decode_calls += 1
            tokens, num, done, stop_len, new_steps = sharding_lib.to_host(
                (state.tokens, state.num_generated, state.done, state.stop_len, state.steps))
            ran = int(new_steps) - steps
            steps = int(new_steps)
            busy = sorted(running)
            self.stats.decode_steps += ran
            self.stats.slot_steps += ran * num_slots
            self.stats.active_slot_steps += int((num[busy] - num_prev[busy]).sum())
            num_prev = num.astype(np.int64)
            for slot in busy:
                if done[slot]:
                    r = running.pop(slot)
                    n = int(num[slot])
                    self.stats.generated_tokens += n
                    yield Result(r.id, tokens[slot, :n - stop_len[slot]].tolist(), "stop" if stop_len[slot] else "length",
                                 len(r.prompt), r.seed)
                    free.append(slot)
            free.sort()


def check_options(gen: GenerationConfig, options: dict) -> None:
    """Raise ValueError/TypeError unless `options` are valid per-request overrides of the job's `gen`."""
    unknown = sorted(set(options) - set(REQUEST_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {list(REQUEST_OPTIONS)}")
    dataclasses.replace(gen, **options).validate()
    # The output buffer and cache are sized for the job's max_new_tokens: a request may ask for fewer, not more.
    if options.get("max_new_tokens", 0) > gen.max_new_tokens:
        raise ValueError(f"max_new_tokens={options['max_new_tokens']} exceeds the job's {gen.max_new_tokens}")


def bucket_pow2(n: int) -> int:
    """The power of two >= n (>= 1): group sizes of prefill calls, so few programs are compiled."""
    return 1 << (int(n) - 1).bit_length()


# --- JSONL jobs -----------------------------------------------------------------------------------------------------


class BadLine(ValueError):
    """An input line the job cannot serve; recorded in the errors file with its reason."""


def stable_hash(value: Any) -> int:
    """A hash of an id that is the same in every process and run (Python's hash() of a str is salted)."""
    return int.from_bytes(hashlib.sha256(json.dumps(value).encode()).digest()[:4], "little")


def request_seed(record: dict, job_seed: int) -> int:
    """The line's own `seed`, else job seed + hash(id): a request's text depends neither on order nor on batch."""
    if "seed" in record:
        seed = record["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise BadLine(f"seed must be a non-negative integer, got {seed!r}")
        return seed % 2**32
    return (job_seed + stable_hash(record["id"])) % 2**32


def _messages_to_turns(messages: Any, system: str) -> tuple[str, list[tuple[str, str]], str]:
    """OpenAI-style messages -> (query, history pairs, system). Ends with a user message; user/assistant alternate."""
    if not isinstance(messages, list) or not messages:
        raise BadLine("messages must be a non-empty list of {role, content}")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadLine(f"each message needs a str role and content, got {str(m)[:80]}")
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected or not roles or roles[-1] != "user":
        raise BadLine(f"messages must alternate user/assistant after an optional system and end with user, got {roles}")
    contents = [m["content"] for m in messages]
    return contents[-1], list(zip(contents[:-2:2], contents[1:-1:2])), system


def parse_record(record: Any, tokenizer, gen: GenerationConfig, chat: bool, system: str,
                 job_seed: int) -> tuple[Request, bool]:
    """A JSON object -> (Request, is_chat). Raises BadLine with the reason."""
    if not isinstance(record, dict):
        raise BadLine(f"a line must be a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise BadLine("missing id")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise BadLine(f"id must be a string or an integer, got {record['id']!r}")
    options = {k: record[k] for k in REQUEST_OPTIONS if k in record}
    try:
        if "messages" in record:
            query, history, line_system = _messages_to_turns(record["messages"], system)
        elif "query" in record:
            query, history, line_system = record["query"], record.get("history") or [], record.get("system", system)
        elif "prompt" in record:
            if not isinstance(record["prompt"], str):
                raise BadLine("prompt must be a string")
            if not chat:
                return Request(record["id"], tokenizer.encode(record["prompt"]), request_seed(record, job_seed),
                               options), False
            query, history, line_system = record["prompt"], [], record.get("system", system)
        else:
            raise BadLine("a line needs one of prompt, messages, query")
        ids = build_chat_prompt(tokenizer, query, history, system=line_system, max_window_size=gen.max_window_size)
    except TypeError as e:  # build_chat_prompt's checks of query/history/system types
        raise BadLine(str(e)) from None
    return Request(record["id"], ids, request_seed(record, job_seed), options), True


def repair_and_read(path: Path, key: str) -> set:
    """Values of `key` in the complete lines of a JSONL file we append to; a torn last line is truncated away.

    Lines are written whole by one write(), so only the last line can be torn (a crash inside that write).
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        print(f"[qwen-jax batch] {path}: truncated a torn last line ({len(data) - end} bytes)", file=sys.stderr)
    found = set()
    for line in data[:end].splitlines():
        try:
            found.add(json.dumps(json.loads(line)[key]))
        except (ValueError, KeyError, TypeError):
            print(f"[qwen-jax batch] {path}: ignoring an unreadable line {line[:80]!r}", file=sys.stderr)
    return found


class AppendLog:
    """Append JSON lines durably: one write() of the whole line, then fsync, so a crash never leaves half a record
    except possibly the very last line (repaired by `repair_and_read` on restart)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while data:  # a regular file takes it in one write; loop only for exotic filesystems
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _owner(record_id: Any, lineno: int, num_replicas: int) -> int:
    """Which replica serves a line: hash(id) % n; a line without a readable id goes by line number."""
    return (stable_hash(record_id) if record_id is not None else lineno) % num_replicas


def run_job(model, tokenizer, input_path: str | Path, output_path: str | Path, errors_path: str | Path | None = None,
            *, chat: bool = False, system: str = DEFAULT_SYSTEM, seed: int = 0, num_slots: int = 16, chunk: int = 8,
            max_group: int = 8, max_prompt_tokens: int | None = None, num_replicas: int = 1, replica_index: int = 0,
            progress: bool = True, **gen_kwargs) -> dict:
    """Generate for every request of a JSONL file; resumable and exactly-once. Returns a summary dict.

    Input lines: {"id", "prompt"} (raw text; ChatML query with chat=True), {"id", "messages": [{role, content}]},
    or {"id", "query", "history": [[q, r], ...]}; optional "seed", "system" and per-request options
    (max_new_tokens <= the job's, do_sample, temperature, top_k, top_p, repetition_penalty).
    Output lines: {"id", "completion", "prompt_tokens", "completion_tokens", "finish_reason", "seed"}.
    Errors (errors_path, default OUTPUT.errors.jsonl): {"line", "id", "reason"}. With num_replicas > 1 this
    process serves only the lines whose stable_hash(id) % num_replicas == replica_index.
    """
    if not 0 <= replica_index < num_replicas:
        raise ValueError(f"replica_index must be in [0, {num_replicas}), got {replica_index}")
    gen = GenerationConfig.resolve(model.generation_config, **gen_kwargs)
    input_path, output_path = Path(input_path), Path(output_path)
    errors_path = Path(errors_path) if errors_path else output_path.with_name(output_path.name + ".errors.jsonl")
    done_ids = repair_and_read(output_path, "id")
    reported = repair_and_read(errors_path, "line")
    max_prompt = int(max_prompt_tokens or gen.max_window_size)

    requests, is_chat, errors, seen_ids = [], {}, [], set()
    with open(input_path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record_id, reason = None, None
            try:
                record = json.loads(raw)
                if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
                    record_id = record["id"]
                if _owner(record_id, lineno, num_replicas) != replica_index:
                    continue
                key = json.dumps(record_id)
                if record_id is not None and key in seen_ids:
                    raise BadLine(f"duplicate id {record_id!r} (first seen earlier in the input)")
                if record_id is not None:
                    seen_ids.add(key)  # even if this line turns out bad: a later line with the id is a duplicate
                request, chat_line = parse_record(record, tokenizer, gen, chat, system, seed)
                if key in done_ids:
                    continue
                if len(request.prompt) > max_prompt:
                    raise BadLine(f"over-long prompt: {len(request.prompt)} tokens > max_prompt_tokens={max_prompt}")
                try:
                    check_options(gen, request.options)
                except (ValueError, TypeError) as e:
                    raise BadLine(str(e)) from None
            except ValueError as e:  # json.JSONDecodeError and BadLine are ValueErrors
                if _owner(record_id, lineno, num_replicas) != replica_index:
                    continue
                reason = str(e) if isinstance(e, BadLine) else f"invalid JSON: {e}"
                errors.append({"line": lineno, "id": record_id, "reason": reason})
                continue
            requests.append(request)
            is_chat[key] = chat_line

    error_log = AppendLog(errors_path)
    for e in errors:
        if json.dumps(e["line"]) not in reported:
            error_log.write(e)
    error_log.close()

    summary = {"input": str(input_path), "output": str(output_path), "errors_file": str(errors_path),
               "already_done": len(done_ids), "errors": len(errors), "requests": len(requests)}
    if not requests:
        return {**summary, "completed": 0, "seconds": 0.0}
    engine = Engine(model, gen, max_prompt_len=max(len(r.prompt) for r in requests),
                    stop_sequences=[[t] for t in chat_stop_ids(tokenizer)], num_slots=num_slots, chunk=chunk,
                    max_group=max_group)
    out = AppendLog(output_path)
    bar = _progress(len(requests), progress)
    start, completed, generated = time.perf_counter(), 0, 0
    try:
        for result in engine.run(requests):
            text = tokenizer.decode(result.tokens)
            out.write({"id": result.id, "completion": text.strip() if is_chat[json.dumps(result.id)] else text,
                       "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
                       "finish_reason": result.finish_reason, "seed": result.seed})
            completed += 1
            generated += len(result.tokens)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}", refresh=False)
    finally:
        out.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    summary.update(completed=completed, completion_tokens=generated, seconds=round(seconds, 3),
                   tokens_per_s=round(generated / seconds, 1), **{f"engine_{k}": v for k, v in engine.stats.as_dict().items()})
    return summary


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="qwen-jax batch", file=sys.stderr, dynamic_ncols=True)
