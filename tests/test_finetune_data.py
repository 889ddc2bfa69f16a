"""Fine-tuning data: labels against an independent transcription of Qwen's finetune.py `preprocess`, and bad samples
reported by id, skipped or refused."""

import json
import re

import numpy as np
import pytest

from qwen_jax.finetune import data
from qwen_jax.finetune.objective import IGNORE
from qwen_jax.tokenizer import QwenTokenizer

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tok():
    return QwenTokenizer.default()


class _HFStyle:
    """The slice of Qwen's HF tokenizer that `preprocess` uses: tokenizer(text).input_ids, where the role strings
    "<|im_start|>user" carry the special token. Content stays plain text (qwen_jax never turns text into specials;
    upstream would, for content that spells one)."""

    def __init__(self, tok):
        self.tok, self.im_start_id, self.im_end_id, self.pad_token_id = tok, tok.im_start_id, tok.im_end_id, tok.eod_id

    def __call__(self, text):
        class Out:
            pass

        out = Out()
        if text.startswith("<|im_start|>"):
            out.input_ids = [self.im_start_id] + self.tok.encode(text[len("<|im_start|>"):])
        else:
            out.input_ids = self.tok.encode(text)
        return out


def qwen_preprocess(sources, tokenizer, max_len, system_message=SYSTEM):
    """Qwen's finetune.py `preprocess`, transcribed rule by rule (IGNORE_TOKEN_ID = -100), padding to max_len."""
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens
    input_ids, targets = [], []
    for source in sources:
        if roles[source[0]["from"]] != roles["user"]:
            source = source[1:]
        input_id, target = [], []
        system = [im_start] + _system + tokenizer(system_message).input_ids + [im_end] + nl_tokens
        input_id += system
        target += [im_start] + [-100] * (len(system) - 3) + [im_end] + nl_tokens
        for sentence in source:
            role = roles[sentence["from"]]
            _input_id = tokenizer(role).input_ids + nl_tokens + tokenizer(sentence["value"]).input_ids + [im_end] + nl_tokens
            input_id += _input_id
            if role == "<|im_start|>user":
                _target = [im_start] + [-100] * (len(_input_id) - 3) + [im_end] + nl_tokens
            else:
                _target = [im_start] + [-100] * len(tokenizer(role).input_ids) + \
                    _input_id[len(tokenizer(role).input_ids) + 1:-2] + [im_end] + nl_tokens
            target += _target
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [-100] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    return np.array(input_ids), np.array(targets)


SAMPLES = [
    {"id": "multi", "conversations": [
        {"from": "user", "value": "你好！请介绍一下自己。"}, {"from": "assistant", "value": "我是通义千问。"},
        {"from": "user", "value": "Tabs\tand\nnewlines, emoji 🤖, <|im_end|> typed as text"},
        {"from": "assistant", "value": "  leading spaces & <|endoftext|> stay text\n"}]},
    {"id": "starts-with-assistant", "conversations": [
        {"from": "assistant", "value": "dropped first turn"}, {"from": "user", "value": "q"},
        {"from": "assistant", "value": "a"}]},
    {"id": "long", "conversations": [
        {"from": "user", "value": "x " * 30}, {"from": "assistant", "value": "答案 " * 40}]},
]


@pytest.mark.parametrize("max_len", [512, 90])  # 90 truncates "long" inside its answer
def test_labels_match_qwen_preprocess(tok, tmp_path, max_len):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(SAMPLES, ensure_ascii=False))
    dataset = data.load_dataset(path, tok, max_len=max_len)
    want_ids, want_labels = qwen_preprocess([s["conversations"] for s in SAMPLES], _HFStyle(tok), max_len)
    assert [s.id for s in dataset.samples] == [s["id"] for s in SAMPLES]
    truncated = [p for p in dataset.problems if p.startswith("truncated")]
    assert len(truncated) == (1 if max_len == 90 else 0) and all("'long'" in p for p in truncated)
    for sample, ids, labels in zip(dataset.samples, want_ids, want_labels):
        n = len(sample.input_ids)
        np.testing.assert_array_equal(sample.input_ids, ids[:n])
        np.testing.assert_array_equal(sample.labels, labels[:n])
        assert np.all(ids[n:] == tok.eod_id) and np.all(labels[n:] == IGNORE)  # the rest is padding
    batch = data.make_batch(dataset.samples, 4, max_len, tok.eod_id)
    np.testing.assert_array_equal(batch.input_ids[:3], want_ids)
    np.testing.assert_array_equal(batch.labels[:3], want_labels)
    assert np.all(batch.labels[3] == IGNORE)  # a filler row trains nothing


BAD = [
    ({"conversations": [{"from": "user", "value": "q"}]}, "#1: missing key 'id'"),
    ({"id": "no-conv"}, "'no-conv' (#2): missing key 'conversations'"),
    ({"id": "empty", "conversations": []}, "'empty' (#3): 'conversations' must be a non-empty list"),
    ({"id": "role", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "'role' (#4): turn 0 has unknown role 'human'"),
    ({"id": "no-value", "conversations": [{"from": "user"}]}, "'no-value' (#5): turn 0 must be an object with"),
    ({"id": "no-answer", "conversations": [{"from": "user", "value": "q"}]}, "'no-answer' (#6): no assistant turn"),
]


def _write(tmp_path, samples):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path


def test_bad_samples_are_reported_and_skipped_or_refused(tok, tmp_path):
    good = {"id": "ok", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}
    path = _write(tmp_path, [good] + [sample for sample, _ in BAD])
    dataset = data.load_dataset(path, tok, max_len=64)
    assert [s.id for s in dataset.samples] == ["ok"]
    assert len(dataset.problems) == len(BAD)
    for problem, (_, message) in zip(dataset.problems, BAD):
        assert problem.startswith("skipped: sample") and message in problem
    for index, (sample, message) in enumerate(BAD, start=1):
        with pytest.raises(data.DataError, match=re.escape(f"{tmp_path / 'data.json'}: sample") + ".*" + re.escape(message)):
            data.load_dataset(_write(tmp_path, [good] * index + [sample]), tok, max_len=64, on_error="raise")


def test_overlong_samples(tok, tmp_path):
    long = {"id": "big", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a " * 100}]}
    prompt_only = {"id": "late", "conversations": [{"from": "user", "value": "q " * 100},
                                                   {"from": "assistant", "value": "a"}]}
    both = [long, prompt_only]
    with pytest.raises(data.DataError, match=r"'big' \(#0\): \d+ tokens, more than max_len 64"):
        data.load_dataset(_write(tmp_path, both), tok, max_len=64, on_overlong="raise")
    skipped = data.load_dataset(_write(tmp_path, [long, prompt_only, SAMPLES[1]]), tok, max_len=64, on_overlong="skip")
    assert [s.id for s in skipped.samples] == ["starts-with-assistant"] and len(skipped.problems) == 2
    truncated = data.load_dataset(_write(tmp_path, both), tok, max_len=64)
    assert [s.id for s in truncated.samples] == ["big"] and len(truncated.samples[0].input_ids) == 64
    assert any("no answer token within max_len" in p and "'late'" in p for p in truncated.problems)
    with pytest.raises(data.DataError, match="no usable sample"):
        data.load_dataset(_write(tmp_path, [prompt_only]), tok, max_len=64)
    with pytest.raises(data.DataError, match="expected a JSON list"):
        data.load_dataset(_write(tmp_path, {"id": 1}), tok, max_len=64)


def test_batches_resume_exactly_and_cover_each_epoch(tok, tmp_path):
    samples = [data.Sample(str(i), np.arange(5 + 5 * i, dtype=np.int32), np.arange(5 + 5 * i, dtype=np.int32))
               for i in range(10)]
    plan = data.epoch_batches(samples, 3, 64, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(10))
    full = data.batches_from(samples, 3, 64, seed=1, pad_id=0)
    seen = [next(full) for _ in range(2 * len(plan))]
    resumed = data.batches_from(samples, 3, 64, seed=1, pad_id=0, epoch=1, index=1)
    for (e, i, want), (e2, i2, got) in zip(seen[len(plan) + 1:], resumed):
        assert (e, i) == (e2, i2)
        np.testing.assert_array_equal(want.input_ids, got.input_ids)
    assert all(b.input_ids.shape[1] in (16, 32, 64) for _, _, b in seen)
