"""Qwen-format fine-tuning data: checked samples, token ids with their loss labels, and length-bucketed batches.

Input (Qwen's finetune.py): a JSON list of {"id", "conversations": [{"from": "user" | "assistant", "value"}, …]}.
Labels follow its `preprocess`: each turn is "<|im_start|>role\\n" + content + "<|im_end|>\\n" after the system
turn; system and user turns keep only <|im_start|>, <|im_end|> and the "\\n" after it as labels; assistant turns keep
<|im_start|>, the content, <|im_end|> and "\\n"; role tokens and system/user content are IGNORE. A conversation not
starting with the user drops its first turn. One deliberate difference: contents are encoded as plain text (as
everywhere in qwen_jax), so "<|im_end|>" typed inside a message is text, never structure.

Bad samples (missing keys, unknown roles, empty conversations, no assistant turn, over-long) are reported with
their id and either skipped or refused (`DataError`), as the caller chooses; none is trained on silently.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from qwen_jax.chat_format import DEFAULT_SYSTEM
from qwen_jax.decoding import bucket
from qwen_jax.finetune.objective import IGNORE
from qwen_jax.tokenizer import QwenTokenizer

ROLES = ("user", "assistant")
ON_ERROR = ("skip", "raise")
ON_OVERLONG = ("truncate", "skip", "raise")


class DataError(ValueError):
    """A data file or sample that cannot be trained on (with the file and sample id)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    input_ids: np.ndarray  # [n] int32
    labels: np.ndarray  # [n] int32, IGNORE where not trained


@dataclasses.dataclass
class Dataset:
    samples: list[Sample]
    problems: list[str]  # one line per sample skipped or truncated, naming it

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)


def encode_conversation(tokenizer: QwenTokenizer, turns: Sequence[dict], system: str = DEFAULT_SYSTEM
                        ) -> tuple[list[int], list[int], int]:
    """One checked conversation -> (input ids, labels, index of the first answer token), by Qwen's `preprocess`
    rules (module docstring)."""
    nl = tokenizer.encode("\n")
    start, end = tokenizer.im_start_id, tokenizer.im_end_id

    def turn(role: str, content: str) -> tuple[list[int], list[int]]:
        head = [start] + tokenizer.encode(role) + nl  # "<|im_start|>role\n"
        body = tokenizer.encode(content)
        ids = head + body + [end] + nl
        kept = body if role == "assistant" else [IGNORE] * len(body)
        return ids, [start] + [IGNORE] * (len(head) - 1) + kept + [end] + nl

    ids, labels = turn("system", system)
    first_answer = None
    for t in turns:
        turn_ids, turn_labels = turn(t["from"], t["value"])
        if first_answer is None and t["from"] == "assistant":
            first_answer = len(ids) + len(tokenizer.encode("assistant")) + len(nl) + 1  # past "<|im_start|>assistant\n"
        ids += turn_ids
        labels += turn_labels
    return ids, labels, first_answer


def check_sample(raw, index: int) -> tuple[str, list[dict]]:
    """(id, the turns to encode) of one raw sample, or DataError naming it and the problem."""
    name = f"#{index}"
    if not isinstance(raw, dict):
        raise DataError(f"sample {name}: expected an object with 'id' and 'conversations', got {type(raw).__name__}")
    if "id" not in raw:
        raise DataError(f"sample {name}: missing key 'id'")
    name = f"{raw['id']!r} (#{index})"
    if "conversations" not in raw:
        raise DataError(f"sample {name}: missing key 'conversations'")
    turns = raw["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"sample {name}: 'conversations' must be a non-empty list, got {turns!r:.60}")
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"sample {name}: turn {j} must be an object with 'from' and 'value', got {t!r:.80}")
        if t["from"] not in ROLES:
            raise DataError(f"sample {name}: turn {j} has unknown role {t['from']!r}; expected one of {ROLES}")
        if not isinstance(t["value"], str):
            raise DataError(f"sample {name}: turn {j} 'value' must be a string, got {type(t['value']).__name__}")
    if turns[0]["from"] != "user":
        turns = turns[1:]  # as Qwen's preprocess
    if not any(t["from"] == "assistant" for t in turns):
        raise DataError(f"sample {name}: no assistant turn to train on")
    return str(raw["id"]), turns


def read_json(path: str | Path) -> list:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read a JSON list of samples ({e})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    return raw


def load_dataset(path: str | Path, tokenizer: QwenTokenizer, max_len: int, on_error: str = "skip",
                 on_overlong: str = "truncate", system: str = DEFAULT_SYSTEM) -> Dataset:
    """Read, check and encode every sample of `path`.

    on_error: "skip" (report and leave the sample out) or "raise" (DataError at the first bad sample).
    on_overlong, for a sample of more than `max_len` tokens: "truncate" (Qwen's behaviour: the first max_len
    tokens; reported), "skip" or "raise". A sample truncated before its first answer token is skipped.
    """
    if on_error not in ON_ERROR or on_overlong not in ON_OVERLONG:
        raise ValueError(f"on_error must be one of {ON_ERROR} and on_overlong one of {ON_OVERLONG}")
    samples, problems = [], []

    def bad(message: str) -> None:
        if on_error == "raise":
            raise DataError(f"{path}: {message}")
        problems.append(f"skipped: {message}")

    for index, raw in enumerate(read_json(path)):
        try:
            sample_id, turns = check_sample(raw, index)
        except DataError as e:
            bad(str(e))
            continue
        ids, labels, first_answer = encode_conversation(tokenizer, turns, system)
        if len(ids) > max_len:
            message = f"sample {sample_id!r} (#{index}): {len(ids)} tokens, more than max_len {max_len}"
            if on_overlong == "raise":
                raise DataError(f"{path}: {message}")
            if on_overlong == "skip":
                problems.append(f"skipped: {message}")
                continue
            problems.append(f"truncated: {message}")
            if first_answer >= max_len:
                problems.append(f"skipped: sample {sample_id!r} (#{index}): no answer token within max_len")
                continue
            ids, labels = ids[:max_len], labels[:max_len]
        samples.append(Sample(sample_id, np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
    if not samples:
        raise DataError(f"{path}: no usable sample ({len(problems)} rejected: {problems[:3]})")
    return Dataset(samples, problems)


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # [B, S] int32, right-padded with <|endoftext|>
    labels: np.ndarray  # [B, S] int32, IGNORE on padding (rows of padding fill a short last batch)
    lengths: np.ndarray  # [B] real tokens per row

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def make_batch(samples: Sequence[Sample], batch_size: int, seq: int, pad_id: int) -> Batch:
    ids = np.full((batch_size, seq), pad_id, np.int32)
    labels = np.full((batch_size, seq), IGNORE, np.int32)
    lengths = np.zeros(batch_size, np.int64)
    for row, s in enumerate(samples):
        ids[row, :len(s.input_ids)] = s.input_ids
        labels[row, :len(s.labels)] = s.labels
        lengths[row] = len(s.input_ids)
    return Batch(ids, labels, lengths)


def bucket_length(n: int, max_len: int) -> int:
    """The padded length of a batch whose longest sample has n tokens (few distinct shapes: few compilations)."""
    return min(bucket(n), max_len)


def epoch_batches(samples: Sequence[Sample], batch_size: int, max_len: int, seed: int, epoch: int
                  ) -> list[list[int]]:
    """Sample indices of every batch of one epoch: samples of similar length batched together, the order shuffled
    by (seed, epoch) alone, so that a run resumed at batch k of an epoch sees exactly the batches it would have."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(samples))
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(bucket_length(len(samples[i].input_ids), max_len), []).append(int(i))
    batches = [members[k:k + batch_size] for _, members in sorted(by_bucket.items())
               for k in range(0, len(members), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_from(samples: Sequence[Sample], batch_size: int, max_len: int, seed: int, pad_id: int,
                 epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index of the batch in its epoch, batch) forever, starting at `epoch`, `index`."""
    while True:
        plan = epoch_batches(samples, batch_size, max_len, seed, epoch)
        for i in range(index, len(plan)):
            chosen = [samples[j] for j in plan[i]]
            seq = bucket_length(max(len(s.input_ids) for s in chosen), max_len)
            yield epoch, i, make_batch(chosen, batch_size, seq, pad_id)
        epoch, index = epoch + 1, 0
