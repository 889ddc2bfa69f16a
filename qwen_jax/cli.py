"""`qwen-jax`: the command line (`chat`, `batch`)."""

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
    model, tokenizer = qwen_jax.load(path, dtype=args.dtype, kv_dtype=args.kv_dtype,
                                     embedding_on_host=args.embedding_on_host)
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


def cmd_batch(args) -> int:
    import json

    from qwen_jax.batch import run_job
    from qwen_jax.chat_format import DEFAULT_SYSTEM

    model, tokenizer = _load(args)
    summary = run_job(model, tokenizer, args.input, args.output, args.errors, chat=args.chat,
                      system=args.system or DEFAULT_SYSTEM, seed=args.seed if args.seed is not None else 0,
                      num_slots=args.slots, chunk=args.chunk, max_group=args.max_group,
                      max_prompt_tokens=args.max_prompt_tokens, num_replicas=args.num_replicas,
                      replica_index=args.replica_index, progress=not args.no_progress,
                      **{k: v for k, v in _gen_kwargs(args).items() if k != "seed"})
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0


def _add_model_and_gen_flags(parser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the embedded tiny random model)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--kv-dtype", choices=["int8", "bfloat16", "float32", "float16"],
                        help="KV cache dtype (default: --dtype); int8 halves the cache's memory")
    parser.add_argument("--embedding-on-host", action="store_true",
                        help="keep the embedding table in host memory (one device; frees 2.3 GiB for Qwen-72B)")
    parser.add_argument("--system", help="system prompt (default: 'You are a helpful assistant.')")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    for name, (kind, help_text) in GEN_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-jax", description="Qwen (v1) chat models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model: one-shot with QUERY, else interactive")
    chat.add_argument("query", nargs="?", help="one question; prints the answer and exits")
    _add_model_and_gen_flags(chat)
    chat.set_defaults(func=cmd_chat)

    batch = sub.add_parser("batch", help="generate for every line of a JSONL file (resumable, exactly-once)")
    batch.add_argument("--input", required=True, help="JSONL: {id, prompt} | {id, messages} | {id, query, history}")
    batch.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    batch.add_argument("--errors", help="JSONL of rejected lines (default: OUTPUT.errors.jsonl)")
    batch.add_argument("--chat", action="store_true", help="wrap raw `prompt` lines in ChatML as a user query")
    batch.add_argument("--slots", type=int, default=16, help="sequences decoded at once (continuous batching)")
    batch.add_argument("--chunk", type=int, default=8, help="decode steps per device call between admissions")
    batch.add_argument("--max-group", type=int, default=8, help="requests prefilled per call at most")
    batch.add_argument("--max-prompt-tokens", type=int, help="longer prompts are rejected (default: max_window_size)")
    batch.add_argument("--num-replicas", type=int, default=1, help="processes sharing the input (by hash of id)")
    batch.add_argument("--replica-index", type=int, default=0, help="this process's share, 0 .. num-replicas - 1")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_and_gen_flags(batch)
    batch.set_defaults(func=cmd_batch)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
