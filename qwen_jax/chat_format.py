"""ChatML prompts for Qwen v1 chat models, token-for-token as upstream `qwen_generation_utils.make_context`.

Structure tokens (<|im_start|>, <|im_end|>) go in as ids; every role name and content is encoded on its own as
plain text, so text inside a message can never close or open a message (QWEN_SPEC.md §3-4). Encoding the pieces
separately (rather than the joined string) also fixes BPE merges at piece boundaries exactly where upstream has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from qwen_jax.tokenizer import QwenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144

# One piece of a prompt: an int is a special id inserted as is; a str is text encoded alone, specials not allowed.
_Piece = int | str
History = Sequence[tuple[str, str]]


class _Block(NamedTuple):
    pieces: list[_Piece]
    ids: list[int]


def chat_stop_ids(tokenizer: QwenTokenizer) -> tuple[int, ...]:
    """A reply ends at <|im_end|>; <|im_start|> and <|endoftext|> also stop a model that skipped it."""
    return (tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id)


def build_chat_prompt(
    tokenizer: QwenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
) -> list[int]:
    """Prompt ids ending in "<|im_start|>assistant\\n"; the oldest history turns are dropped to fit the window.

    Truncation as upstream: walk history newest first, keep a turn while system + kept turns + this turn
    < max_window_size tokens, and stop at the first turn that does not fit. The query itself is never counted or
    dropped, so the prompt can exceed max_window_size.
    """
    return [i for block in _prompt_blocks(tokenizer, query, history, system, max_window_size) for i in block.ids]


def render_chat_prompt(
    tokenizer: QwenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
) -> str:
    """The text of the prompt `build_chat_prompt` returns, same truncation, for display and logging only.

    Not to be re-encoded with specials allowed: that would turn "<|im_end|>" typed by a user into structure.
    """
    blocks = _prompt_blocks(tokenizer, query, history, system, max_window_size)
    return "".join(
        piece if isinstance(piece, str) else str(tokenizer.id_to_token(piece))
        for block in blocks
        for piece in block.pieces
    )


def _prompt_blocks(
    tokenizer: QwenTokenizer, query: str, history: History | None, system: str, max_window_size: int
) -> list[_Block]:
    """System block, the history turns that fit (oldest first), then the query block."""
    _check_str("query", query)
    _check_str("system", system)
    turns = _checked_history(history)
    if isinstance(max_window_size, bool) or not isinstance(max_window_size, int):
        raise TypeError(f"max_window_size must be an int, got {type(max_window_size).__name__}")

    def block(pieces: list[_Piece]) -> _Block:
        ids = [i for p in pieces for i in ([p] if isinstance(p, int) else tokenizer.encode(p))]
        return _Block(pieces, ids)

    def message(role: str, content: str) -> list[_Piece]:
        return [tokenizer.im_start_id, role, "\n", content, tokenizer.im_end_id]

    system_block = block(message("system", system))
    kept_turns: list[_Block] = []  # newest first while walking
    kept_size = 0
    for turn_query, turn_response in reversed(turns):
        turn = block(["\n", *message("user", turn_query), "\n", *message("assistant", turn_response)])
        if len(system_block.ids) + kept_size + len(turn.ids) >= max_window_size:
            break  # upstream stops here even if an older, shorter turn would still fit
        kept_turns.append(turn)
        kept_size += len(turn.ids)
    query_block = block(["\n", *message("user", query), "\n", tokenizer.im_start_id, "assistant", "\n"])
    return [system_block, *reversed(kept_turns), query_block]


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")


def _checked_history(history: History | None) -> list[tuple[str, str]]:
    if history is None:
        return []
    # A str or dict is iterable too, and would fail confusingly later; insist on a real list of pairs.
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    turns: list[tuple[str, str]] = []
    for index, entry in enumerate(history):
        # Lists are accepted because histories round-tripped through JSON come back as [query, response].
        if not (
            isinstance(entry, (tuple, list))
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
        ):
            shown = repr(entry)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise TypeError(f"history[{index}] must be a (query, response) pair of str, got {shown}")
        turns.append((entry[0], entry[1]))
    return turns
