"""The `edgekit` command.

Device commands (generate, info, ...) import only the device side; host commands
(export, ...) import torch and transformers when they run, not before.
User mistakes are printed as one line on stderr with exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

import edgekit
from edgekit.errors import EdgekitError, UserError

# Modules that add their own subcommands with register(subparsers).
COMMAND_MODULES: list[str] = ["edgekit.device.bench_cli", "edgekit.device.eval_cli", "edgekit.device.mqtt_cli",
                              "edgekit.device.targets_cli"]


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line that points to the command's own --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="edgekit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    parser.add_argument("--version", action="version", version=f"edgekit {edgekit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_export(sub)
    _add_finetune(sub)
    _add_generate(sub)
    _add_info(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand, whose flags the user was giving
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="edgekit: %(message)s", stream=sys.stderr)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user-facing errors are one line (with -v, the traceback); bugs keep their traceback
        if isinstance(e, EdgekitError) and not args.verbose:
            print(f"edgekit {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


# -- export ------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to a bundle (host side)",
                       description="Export a model to a bundle a device can run. SOURCE is a shipped model "
                                   "name (smollm2-135m), a Hugging Face model folder, or a .gguf file.")
    p.add_argument("source", help="smollm2-135m, a Hugging Face folder, or a .gguf file")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--context-length", type=int, help="KV cache length (default: min(2048, the model's maximum))")
    p.add_argument("--target", help="device profile(s) from targets/ (see `edgekit targets`), comma-separated: "
                                    "one bundle per target in OUT/<target>; its defaults apply where no flag is given "
                                    "(default: a generic fp32 x86-64 bundle)")
    p.add_argument("--flavour", choices=["fused", "portable"],
                   help="graph operators: fused (onnxruntime's contrib operators) or portable (standard ONNX only); "
                        "default: the target's, else fused")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="the chat template to ship: alpaca (= dolly), oasst, or a Jinja file (default: the model's "
                        "own; models without one take plain prompts)")
    p.add_argument("--fit-context", action="store_true",
                   help="shrink the context length until the bundle fits the target's memory instead of refusing")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH[:WEIGHT]",
                   help="a PEFT adapter folder to merge (LoRA) or bake in (prefix tuning); repeatable")
    q = p.add_argument_group("quantization")
    q.add_argument("--quant", choices=["none", "rtn", "gptq", "awq", "smoothquant", "w8a8"],
                   help="method (default: none); w8a8 is SmoothQuant without smoothing, its baseline")
    q.add_argument("--bits", type=int, help="weight bits: 4 or 8")
    q.add_argument("--group-size", type=int, help="weights per scale: 32, 64, 128, or 0 for per-channel")
    q.add_argument("--sym", action="store_true", help="symmetric weights, no zero points (default: asymmetric)")
    q.add_argument("--calib", help="calibration text: a .txt file or a .jsonl of {\"text\": ...}")
    q.add_argument("--calib-samples", type=int, help="calibration samples (N)")
    q.add_argument("--calib-seq-len", type=int, help="tokens per calibration sample (L)")
    q.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0)")
    q.add_argument("--damp", type=float, help="gptq: dampening added to the Hessian's diagonal, as a fraction of "
                                              "its mean (default 0.01)")
    q.add_argument("--no-act-order", dest="act_order", action="store_false", default=None,
                   help="gptq: quantize columns in their stored order, not by decreasing activation")
    q.add_argument("--awq-grid", type=int, help="awq: scale exponents tried per layer group (default 20)")
    q.add_argument("--alpha", type=float, help="smoothquant: migration strength 0..1 (default 0.5)")
    q.add_argument("--lm-head-bits", type=int, choices=[4, 8],
                   help="lm_head weights: 8 per channel (default) or 4 in blocks of 32 (faster decode, "
                        "higher perplexity)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    try:
        from edgekit.host import ExportOptions, export
    except ImportError as e:
        raise UserError(f"export needs the host side ({e}); from the edgekit checkout: "
                        f"pip install -c constraints.txt -e '.[export]'") from None
    if args.context_length is not None and args.context_length < 2:
        raise UserError("--context-length must be at least 2")
    from pathlib import Path

    from edgekit.device.targets import load_targets

    targets = load_targets(args.target) if args.target else [None]  # all of them, before any work: fail fast
    for t in targets:
        options = ExportOptions(context_length=args.context_length, adapters=args.adapter, quant=args.quant,
                                bits=args.bits, group_size=args.group_size, sym=args.sym, calib=args.calib,
                                calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
                                damp=args.damp, act_order=args.act_order, awq_grid=args.awq_grid, alpha=args.alpha,
                                lm_head_bits=args.lm_head_bits, flavour=args.flavour,
                                chat_template=args.chat_template,
                                fit_context=args.fit_context, **({"target": t.path} if t else {}))
        out = Path(args.out) / t.name if len(targets) > 1 else args.out  # several targets: one folder each
        print(export(args.source, out, options))
    return 0


# -- finetune ----------------------------------------------------------------------


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA adapter on chat examples (host side, CPU)",
                       description="Train a LoRA adapter on a JSONL of chat examples ({\"messages\": [...]} per "
                                   "line, ending with the assistant's answer, the part learnt); then export with "
                                   "--adapter.")
    p.add_argument("source", help="smollm2-135m, a Hugging Face folder, or a .gguf file")
    p.add_argument("--data", required=True, help="the training examples, JSONL")
    p.add_argument("--out", required=True, help="the adapter folder to write")
    for flag, kind, default, what in (("--steps", int, 200, "optimizer steps"), ("--batch-size", int, 8, "examples "
                                      "per step"), ("--lr", float, 1e-3, "learning rate"), ("--rank", int, 8,
                                      "LoRA rank"), ("--alpha", int, 16, "LoRA alpha"), ("--max-len", int, 256,
                                      "tokens per example, at most"), ("--seed", int, 0, "seed"),
                                      ("--threads", int, None, "torch threads")):
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    try:
        from edgekit.host.finetune import FinetuneOptions, finetune
    except ImportError as e:
        raise UserError(f"finetune needs the host side ({e}); from the edgekit checkout: "
                        f"pip install -c constraints.txt -e '.[export]'") from None
    options = FinetuneOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                              alpha=args.alpha, max_len=args.max_len, seed=args.seed, threads=args.threads)
    finetune(args.source, args.data, args.out, options, say=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


# -- generate ----------------------------------------------------------------------


def _add_generate(sub) -> None:
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
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the target's)")
    p.add_argument("--stats", action="store_true", help="print one line of timings after the answer")
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
    try:
        stream = model.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, stop=args.stop, min_p=args.min_p,
                              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                              logit_bias=_logit_bias(args.logit_bias), top_logprobs=args.logprobs, **constraint)
    except ValueError as e:
        raise UserError(str(e)) from None
    for piece in stream:
        if not args.tools:  # a tool call is printed whole once parsed
            sys.stdout.write(piece)
            sys.stdout.flush()
    done = stream.completion
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
        print(f"edgekit generate: the answer is incomplete ({done.finish_reason}): it does not yet follow the "
              "schema or grammar; raise --max-new-tokens", file=sys.stderr)
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


# -- info --------------------------------------------------------------------------


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="verify a bundle and show its manifest")
    p.add_argument("bundle")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from edgekit.device import Model

    model = Model(args.bundle, threads=1)  # opens everything a device would: hashes, graph, tokenizer, prefix
    m = model.manifest
    a = m.architecture
    print(f"bundle        {args.bundle} ({model.bundle_hash}), format {m.format_version}, all files verified "
          "(hashes, graph, tokenizer)")
    print(f"architecture  {a.model_type}: {a.num_layers} layers, hidden {a.hidden_size}, heads {a.num_heads}/"
          f"{a.num_kv_heads} kv, head size {a.head_size}, vocab {a.vocab_size}, context {a.context_length}")
    print(f"quantization  {m.quantization}")
    print(f"graph         {m.graph['flavour']}, opset {m.graph['opset']}")
    print(f"target        {m.target.get('name')}")
    print(f"chat          {'yes' if m.chat else 'no'}")
    for name, digest in sorted(m.files.items()):
        print(f"  {digest[:16]}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
