"""`edgekit generate`: stream an answer from a bundle (device side)."""

from __future__ import annotations

import argparse
import json
import sys

from edgekit.cli import THREADS_DEFAULT
from edgekit.errors import EdgekitError, UserError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a bundle (device side)",
                       description="Generate text from a bundle, streaming tokens as they come.")
    p.add_argument("bundle", help="a bundle folder made by `edgekit export`")
    p.add_argument("prompt", nargs="?", help="a plain prompt (continued as text)")
    p.add_argument("--chat", metavar="MESSAGE", help="a user message, formatted with the model's chat template")
    p.add_argument("--system", help="a system message for --chat")
    p.add_argument("--max-new-tokens", type=int, help="default: the bundle's (256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the bundle's)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--min-p", type=float, help="keep tokens at least this share of the top token's probability")
    p.add_argument("--presence-penalty", type=float, help="-2..2: lower the odds of any token already generated")
    p.add_argument("--frequency-penalty", type=float, help="-2..2: lower them by how often it was generated")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit; repeatable")
    p.add_argument("--logprobs", type=int, metavar="N", help="print each token's log-probability and the N likeliest "
                                                            "tokens (stderr, one JSON line per token)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, help=f"onnxruntime intra-op threads (default: {THREADS_DEFAULT})")
    p.add_argument("--stats", action="store_true", help="print one line of timings after the answer")
    p.add_argument("--prompt-lookup", action=argparse.BooleanOptionalAction,
                   help="greedy: draft tokens from the prompt's n-grams, verified in one run (default: on when "
                        "exact, fp32 matmuls; opt-in for int8-compute bundles)")
    c = p.add_argument_group("constrained output (one of)").add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE", help="a JSON schema file the answer must follow")
    c.add_argument("--regex", help="a regular expression the whole answer must match")
    c.add_argument("--grammar", metavar="FILE", help="a Lark grammar file (llguidance's dialect) for the answer")
    c.add_argument("--tools", metavar="FILE", help="a JSON file of OpenAI-shaped function tools (with --chat): "
                                                   "prints the model's tool calls as JSON")
    p.add_argument("--tool-choice", default="auto", help="with --tools: auto (default), required, none, or a tool's "
                                                        "name")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from edgekit.device import Model

    if (args.prompt is None) == (args.chat is None):
        raise UserError("give either a PROMPT or --chat MESSAGE")
    if args.system and args.chat is None:
        raise UserError("--system goes with --chat")
    prompt = args.prompt
    if args.chat is not None:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.chat}]
    constraint = {"json_schema": _read_text(args.json_schema, "--json-schema") if args.json_schema else None,
                  "regex": args.regex, "grammar": _read_text(args.grammar, "--grammar") if args.grammar else None}
    if args.tool_choice != "auto" and not args.tools:
        raise UserError("--tool-choice goes with --tools FILE")
    if args.tools:
        if args.chat is None:
            raise UserError("--tools goes with --chat MESSAGE")
        try:
            constraint["tools"] = json.loads(_read_text(args.tools, "--tools"))
        except json.JSONDecodeError as e:
            raise UserError(f"--tools {args.tools}: not JSON ({e})") from None
        choice = args.tool_choice
        constraint["tool_choice"] = choice if choice in ("auto", "required", "none") else \
            {"type": "function", "function": {"name": choice}}
    model = Model(args.bundle, threads=args.threads)
    stream = model.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          logit_bias=_logit_bias(args.logit_bias), top_logprobs=args.logprobs,
                          prompt_lookup=args.prompt_lookup, **constraint)
    printed = False
    try:
        for piece in stream:
            if not args.tools:  # a tool call is printed whole once parsed
                sys.stdout.write(piece)
                sys.stdout.flush()
                printed = printed or bool(piece)
    except EdgekitError:
        if printed:  # the error goes on a line of its own, not after the partial answer
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    done = stream.completion
    assert done is not None  # set once the stream is iterated to its end
    if args.tools:
        sys.stdout.write(json.dumps(done.tool_calls) if done.tool_calls else done.text)
    sys.stdout.write("\n")
    if not done.token_ids and done.finish_reason == "eos" and args.chat is None and model.manifest.chat:
        print("edgekit generate: the model ended its answer at once; chat models answer --chat MESSAGE",
              file=sys.stderr)
    if done.finish_reason == "context":
        print(f"edgekit generate: stopped at the context length ({model.context_length} tokens)", file=sys.stderr)
    for entry in done.logprobs or []:
        print(json.dumps(entry, ensure_ascii=False), file=sys.stderr)
    if done.valid is False:
        why = {"length": "cut at --max-new-tokens (raise it)", "context": "cut at the context length",
               "stop": "cut by a --stop string"}.get(done.finish_reason, "its JSON names a key twice")
        print(f"edgekit generate: the answer does not follow the schema or grammar: {why}", file=sys.stderr)
    if args.stats:
        print(f"[{done.finish_reason}] {done.stats.summary()} | {model.provider}", file=sys.stderr)
    return 0 if done.valid is not False else 3


def _logit_bias(items: list[str]) -> dict[int, float] | None:
    bias = {}
    for item in items:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise UserError(f"--logit-bias {item}: expected TOKEN_ID=BIAS, e.g. 1234=-100") from None
    return bias or None


def _read_text(path: str, flag: str) -> str:
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror if isinstance(e, OSError) else e})") from None
