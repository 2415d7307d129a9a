"""``acm eval``: accuracy and response length of models on a question/answer set or a benchmark preset,
or of saved replies (``--predictions``)."""

from __future__ import annotations

import argparse
import json
import sys

from acm.errors import InputError
from acm.evaluation.engines import ENGINES

DEFAULT_MAX_NEW_TOKENS = 512
PRESET_HELP = "gsm8k, math500, aime24, minerva (Hub datasets; see docs/evaluation.md)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="accuracy + response length of models (greedy or sampled) or of saved replies",
        description="Batched evaluation: accuracy (answers checked with math-verify), mean/median response length "
                    "in tokens (thinking / answer split for models that think), per difficulty level when the data "
                    "has one. Problems from --data or a benchmark --preset; or score saved replies with --predictions.")
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", action="append", default=None, metavar="MODEL",
                     help="local model folder or Hub id (safetensors); repeat for several models")
    src.add_argument("--data", default=None, metavar="FILE", help=".jsonl with question/answer (optional level) fields")
    src.add_argument("--preset", default=None, metavar="NAME", help=f"benchmark preset: {PRESET_HELP}")
    src.add_argument("--preset-source", default=None, metavar="DIR",
                     help="a local copy of the preset's Hub dataset (same layout), e.g. a mirror")
    src.add_argument("--predictions", default=None, metavar="FILE",
                     help="score saved replies instead of generating (.jsonl: question, gold, reply per line)")
    src.add_argument("--tokenizer", default=None, metavar="MODEL",
                     help="with --predictions: count tokens with this tokenizer when the file has no num_tokens")
    src.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    src.add_argument("--field-question", default="question")
    src.add_argument("--field-answer", default="answer", help="gold answer field (GSM8K '#### 42' is understood)")
    src.add_argument("--prompt-template", default=None, metavar="TEXT",
                     help="what the model is asked, with {question}; presets use the L2S prompt by default")
    dec = p.add_argument_group("decoding (greedy unless --temperature > 0 or --generation-config)")
    dec.add_argument("--max-new-tokens", type=int, default=None,
                     help="default 512, up to 32768 (hours on CPU for a reasoning model); with --predictions: "
                          "the limit the replies were generated with, to spot truncation")
    dec.add_argument("--temperature", type=float, default=None, help="0 = greedy (default); R1-distill cards: 0.6")
    dec.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1.0; R1-distill cards: 0.95)")
    dec.add_argument("--top-k", type=int, default=None, help="top-k sampling (default 0 = off)")
    dec.add_argument("--samples", type=int, default=1, help="replies per problem when sampling; accuracy is the mean")
    dec.add_argument("--seed", type=int, default=0, help="sampling seed (same seed + batch size = same replies)")
    dec.add_argument("--generation-config", action="store_true",
                     help="sample as each model's generation_config.json says (explicit flags still win)")
    dec.add_argument("--batch-size", type=int, default=16)
    dec.add_argument("--no-chat-template", action="store_true", help="prompt with the raw question text")
    p.add_argument("--no-fast-path", action="store_true", help="check plain numbers with math-verify too")
    p.add_argument("--save-replies", default=None, metavar="FILE",
                   help="also write every reply as .jsonl (the --predictions format)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA in bfloat16 when available)")
    p.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="generation engine: transformers (default) or vllm (optional: pip install vllm, needs a CUDA "
                        "GPU; same prompts, stop tokens and grading; unverified, see README)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (unsafe)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the folder (unsafe)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the results JSON")
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> None:
    if args.predictions:
        if args.model or args.data or args.preset:
            raise InputError("--predictions scores saved replies; do not combine it with --model, --data or --preset")
        return
    if not args.model:
        raise InputError("pass --model MODEL (with --data or --preset), or --predictions FILE")
    if args.data and args.preset:
        raise InputError("pass either --data or --preset, not both")
    if not args.data and not args.preset:
        raise InputError("no problems: pass --data FILE.jsonl or --preset NAME")
    if args.preset_source and not args.preset:
        raise InputError("--preset-source needs --preset")
    if args.tokenizer:
        raise InputError("--tokenizer is for --predictions; a model's own tokenizer is used when generating")
    from acm.evaluation.engines import check_engine

    check_engine(args.engine, device=args.device)   # before any model or data is loaded


def run(args: argparse.Namespace) -> int:
    from acm.evaluation.evaluate import evaluate, length_warning, save_results, score_predictions
    from acm.evaluation.generation import check_max_new_tokens

    _check(args)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.predictions:
        result = score_predictions(args.predictions, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens,
                                   limit=args.limit, fast_path=not args.no_fast_path,
                                   trust_remote_code=args.trust_remote_code)
    else:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
        check_max_new_tokens(args.max_new_tokens)
        warning = length_warning(args.max_new_tokens, args.device)
        if warning:
            print(f"acm eval: warning: {warning}", file=sys.stderr)
        result = evaluate(args.model, args.data, preset=args.preset, preset_source=args.preset_source,
                          limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          field_question=args.field_question, field_answer=args.field_answer,
                          prompt_template=args.prompt_template, chat_template=not args.no_chat_template,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, samples=args.samples,
                          seed=args.seed, use_generation_config=args.generation_config,
                          fast_path=not args.no_fast_path, save_replies=args.save_replies,
                          trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                          device=args.device, engine=args.engine)
    save_results(result, args.out)
    for m in result["models"]:
        keys = ("model", "accuracy", "mean_length", "median_length", "n", "replies", "truncated",
                "truncated_in_thinking", "mean_thinking_length", "mean_answer_length")
        print(json.dumps({k: m[k] for k in keys if k in m and m[k] is not None}))
    if result.get("replies_file"):
        print(f"wrote {result['replies_file']}")
    print(f"wrote {args.out}")
    return 0
