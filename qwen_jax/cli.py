"""`qwen-jax`: the command line (`chat`, `batch`, `finetune`)."""

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
                                     embedding_on_host=args.embedding_on_host, adapter=args.adapter)
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

    import jax

    model, tokenizer = _load(args)
    # Each process loads its model onto its own devices (load's default mesh is local), so by default each is a
    # replica serving its share of the input: one process, or every process of a multi-process run.
    num_replicas = args.num_replicas if args.num_replicas is not None else jax.process_count()
    replica_index = args.replica_index if args.replica_index is not None else jax.process_index()
    summary = run_job(model, tokenizer, args.input, args.output, args.errors, chat=args.chat,
                      system=args.system or DEFAULT_SYSTEM, seed=args.seed if args.seed is not None else 0,
                      num_slots=args.slots, chunk=args.chunk, max_group=args.max_group,
                      max_prompt_tokens=args.max_prompt_tokens, num_replicas=num_replicas,
                      replica_index=replica_index, progress=not args.no_progress,
                      **{k: v for k, v in _gen_kwargs(args).items() if k != "seed"})
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0


def cmd_finetune(args) -> int:
    import qwen_jax
    from qwen_jax import sharding
    from qwen_jax.finetune import lora, train

    mesh = None
    if args.mesh:
        data, model_axis = (int(n) for n in args.mesh.lower().split("x"))
        mesh = sharding.make_mesh({"data": data, "model": model_axis})
    model, tokenizer = qwen_jax.load(args.model, dtype=args.dtype, mesh=mesh, strategy=args.strategy)
    targets = args.target_modules[0] if args.target_regex else tuple(args.target_modules)
    config = train.TrainConfig(
        lora=lora.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets),
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
        max_steps=args.max_steps, max_len=args.max_len, seed=args.seed, remat=not args.no_remat,
        save_every=args.save_every, eval_every=args.eval_every, on_error=args.on_error, on_overlong=args.on_overlong)
    result = train.finetune(model, tokenizer, args.data, args.output, eval_path=args.eval, config=config,
                            progress=not args.no_progress, base_model=args.model)
    print(f"[qwen-jax] adapter written to {result.adapter_dir} after {result.steps} steps (last loss "
          f"{result.train_loss:.4f}{'' if result.eval_loss is None else f', eval loss {result.eval_loss:.4f}'})",
          file=sys.stderr)
    return 0


def _add_finetune_parser(sub) -> None:
    from qwen_jax.finetune import lora, train

    defaults, lora_defaults = train.TrainConfig(), lora.LoraConfig()
    ft = sub.add_parser("finetune", help="train a LoRA adapter (Q-LoRA on an int8 base); resumable")
    ft.add_argument("--model", required=True, help="checkpoint directory (float or GPTQ Int8)")
    ft.add_argument("--data", required=True, help="training data: Qwen's JSON list of {id, conversations}")
    ft.add_argument("--eval", help="held-out data in the same format (evaluation loss)")
    ft.add_argument("--output", required=True, help="adapter, checkpoints and metrics.jsonl; rerun to resume")
    ft.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="compute dtype (factors and optimizer state stay float32)")
    ft.add_argument("--strategy", default="replicated", help="sharding strategy (qwen_jax.sharding.STRATEGIES)")
    ft.add_argument("--mesh", help="DATAxMODEL device mesh, e.g. 2x4 (default: the strategy's)")
    ft.add_argument("--lora-r", type=int, default=lora_defaults.r)
    ft.add_argument("--lora-alpha", type=float, default=lora_defaults.alpha)
    ft.add_argument("--lora-dropout", type=float, default=lora_defaults.dropout)
    ft.add_argument("--target-modules", nargs="+", default=list(lora_defaults.target_modules),
                    help="module names as PEFT matches them (c_attn, c_proj, w1, w2, lm_head, attn.c_proj, …)")
    ft.add_argument("--target-regex", action="store_true", help="--target-modules is one regular expression")
    ft.add_argument("--lr", type=float, default=defaults.learning_rate)
    ft.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    ft.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    ft.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    ft.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per micro-batch")
    ft.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    ft.add_argument("--epochs", type=int, default=defaults.epochs)
    ft.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    ft.add_argument("--max-len", type=int, default=defaults.max_len, help="tokens per sample at most")
    ft.add_argument("--seed", type=int, default=defaults.seed)
    ft.add_argument("--save-every", type=int, default=defaults.save_every, help="optimizer steps between checkpoints")
    ft.add_argument("--eval-every", type=int, default=defaults.eval_every, help="0: evaluate at the end only")
    ft.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing each layer")
    ft.add_argument("--on-error", choices=["skip", "raise"], default=defaults.on_error, help="bad samples")
    ft.add_argument("--on-overlong", choices=["truncate", "skip", "raise"], default=defaults.on_overlong)
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=cmd_finetune)


def _add_model_and_gen_flags(parser) -> None:
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run first (jax.distributed.initialize): the coordinator, process "
                             "count and index come from Slurm or Open MPI, which JAX detects, or from the flags below")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (with --distributed)")
    parser.add_argument("--num-processes", type=int, help="processes in the run (with --distributed)")
    parser.add_argument("--process-id", type=int, help="this process's index in the run (with --distributed)")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded tiny random model)")
    parser.add_argument("--adapter", help="a LoRA adapter directory (PEFT format, e.g. from qwen-jax finetune)")
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
    batch.add_argument("--num-replicas", type=int,
                       help="processes sharing the input, by hash of id (default: the run's process count)")
    batch.add_argument("--replica-index", type=int,
                       help="this process's share, 0 .. num-replicas - 1 (default: its process index)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_and_gen_flags(batch)
    batch.set_defaults(func=cmd_batch)
    _add_finetune_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "distributed", False):
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
