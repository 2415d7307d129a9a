"""``acm eval``: accuracy and response length of one or more models on a question/answer set."""

from __future__ import annotations

import argparse
import json

from acm.errors import InputError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="accuracy + response length (greedy) of models on a jsonl set",
                              description="Greedy, batched evaluation: accuracy, mean/median response length "
                                          "in tokens, per difficulty level when the data has 'level'.")
    p.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="local model folder or Hub id (safetensors); repeat for several models")
    p.add_argument("--data", required=True, metavar="FILE", help=".jsonl with question/answer fields")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--field-question", default="question")
    p.add_argument("--field-answer", default="answer", help="gold answer field (GSM8K '#### 42' is understood)")
    p.add_argument("--no-chat-template", action="store_true", help="prompt with the raw question text")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA in bfloat16 when available)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (unsafe)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder (unsafe)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the results JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from acm.evaluate import evaluate, save_results

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    result = evaluate(args.model, args.data, limit=args.limit, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, field_question=args.field_question,
                      field_answer=args.field_answer, chat_template=not args.no_chat_template,
                      trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                      device=args.device)
    save_results(result, args.out)
    for m in result["models"]:
        line = {k: m[k] for k in ("model", "accuracy", "mean_length", "median_length", "n")}
        print(json.dumps(line))
    print(f"wrote {args.out}")
    return 0
