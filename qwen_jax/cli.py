"""`qwen-jax`: the command line (chat now; batch and bench join as they land)."""

from __future__ import annotations

import argparse
import sys
import time

GEN_OPTIONS = {  # flag -> (type, help)
    "max_new_tokens": (int, "tokens to generate at most"),
    "temperature": (float, "sampling temperature"),
    "top_k": (int, "keep the k most likely tokens (0 = off)"),
    "top_p": (float, "nucleus sampling mass"),
    "repetition_penalty": (float, "penalty on ids already in the prompt or output (1 = off)"),
    "seed": (int, "random seed (same seed, same text)"),
    "max_window_size": (int, "history is truncated to keep the prompt under this many tokens"),
}


def _gen_kwargs(args) -> dict:
    kwargs = {k: getattr(args, k) for k in GEN_OPTIONS if getattr(args, k) is not None}
    if args.greedy:
        kwargs["do_sample"] = False
    return kwargs


def _load(args):
    import qwen_jax
    from qwen_jax import testing

    path = args.model
    if path is None:
        path = testing.default_checkpoint_dir()
        print(f"[qwen-jax] no --model given: using the embedded tiny random model at {path}.\n"
              "[qwen-jax] It exercises the whole pipeline; its text is gibberish.", file=sys.stderr)
    start = time.perf_counter()
    model, tokenizer = qwen_jax.load(path, dtype=args.dtype)
    print(f"[qwen-jax] loaded {path} ({model.config.num_params / 1e9:.2f}B parameters, {args.dtype}) "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model, tokenizer


def cmd_chat(args) -> int:
    from qwen_jax.chat_api import chat, chat_stream
    from qwen_jax.chat_format import DEFAULT_SYSTEM

    model, tokenizer = _load(args)
    gen = _gen_kwargs(args)
    system = args.system or DEFAULT_SYSTEM
    if args.query is not None:
        response, _ = chat(model, tokenizer, args.query, system=system, **gen)
        print(response)
        return 0

    history: list[tuple[str, str]] = []
    print("Interactive chat. /reset clears the history, /system TEXT sets the system prompt, /exit quits; "
          "Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            query = input("\nUser> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if query.strip() in ("/exit", "/quit"):
            return 0
        if query.strip() == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        if query.startswith("/system"):
            system = query[len("/system"):].strip() or DEFAULT_SYSTEM
            history = []
            print(f"[system prompt set; history cleared] {system}", file=sys.stderr)
            continue
        print("Qwen> ", end="", flush=True)
        shown = ""
        try:
            for text in chat_stream(model, tokenizer, query, history=history, system=system, **gen):
                print(text[len(shown):] if text.startswith(shown) else "\n" + text, end="", flush=True)
                shown = text
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        history.append((query, shown))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-jax", description="Qwen (v1) chat models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model: one-shot with QUERY, else interactive")
    chat.add_argument("query", nargs="?", help="one question; prints the answer and exits")
    chat.add_argument("--model", help="checkpoint directory (default: the embedded tiny random model)")
    chat.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    chat.add_argument("--system", help="system prompt (default: 'You are a helpful assistant.')")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    for name, (kind, help_text) in GEN_OPTIONS.items():
        chat.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
