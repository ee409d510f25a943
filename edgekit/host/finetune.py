"""Teach a small model a command vocabulary: LoRA on the CPU from a JSONL of chat examples.

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "content": ...}]}   per line

Each example is rendered with the model's own chat template; the loss is taken on the last
(assistant) message only, so the model learns to answer, not to repeat prompts. The adapter is
a plain peft LoRA folder on every Linear of the family's layers, ready for
`edgekit export --adapter`. Small on purpose: a 135M model learns a robot's command set in a few
minutes on a laptop's CPU.

    load ──► render and mask examples ──► LoRA (peft) ──► AdamW, loss per step ──► save_pretrained
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekit.device.sampling import is_unicode
from edgekit.device.threads import MAX_THREADS
from edgekit.device.tools import earlier_calls
from edgekit.errors import ExportError
from edgekit.host.families import family_of
from edgekit.host.load import load

IGNORE = -100  # labels that take no part in the loss (the prompt)


@dataclass
class FinetuneOptions:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    max_len: int = 256  # tokens per example; longer ones are refused, not cut
    seed: int = 0
    threads: int | None = None  # torch threads; None: torch's default


def read_examples(path: str | Path) -> list[tuple[int, list[dict]]]:
    """The conversations of a JSONL file, each with its line number; ExportError naming the line of
    the first bad one. An assistant turn may carry OpenAI-shaped tool_calls (and content null)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--data {path}: {'a folder, not a JSONL file' if path.is_dir() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Windows' editors write one) is not JSON
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"--data {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    examples = []
    # JSON Lines ends a line at "\n" only: str.splitlines() also splits at U+2028, U+0085, ... inside strings
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:  # not JSON, nested too deeply, an integer of > 4300 digits
            raise ExportError(f"--data {path}: line {n} is not JSON ({getattr(e, 'msg', None) or e})") from None
        messages = item.get("messages") if isinstance(item, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and (isinstance(m.get("content"), str) or (
                    m.get("content") is None and m["role"] == "assistant" and m.get("tool_calls")))
                for m in messages):
            raise ExportError(f"--data {path}: line {n} needs {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ExportError(f"--data {path}: line {n} must end with the assistant's answer (the part learnt), "
                              "after what it answers")
        if not all(is_unicode(m["content"] or "") for m in messages):
            raise ExportError(f"--data {path}: line {n} holds a lone surrogate (\\udxxx), which is not text")
        examples.append((n, messages))
    if not examples:
        raise ExportError(f"--data {path}: no examples")
    return examples


def encode(tokenizer, messages: list[dict], max_len: int, where: str = "an example",
           limit: str = "--max-len") -> tuple[list[int], list[int]]:
    """Token ids of the conversation and its labels: the answer's tokens, IGNORE elsewhere.

    The prompt and the answer are tokenized apart, as the device does (it encodes the rendered prompt,
    then generates): tokenized together, "\n" + an answer's leading space can merge into one token.
    Earlier tool calls become what the template reads (device/tools.py), as on the device."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    messages = earlier_calls(messages, "tools" in template)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ExportError(f"{where}: this model's chat template renders an answer differently from its generation "
                          "prompt; it cannot be fine-tuned on the answer alone")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if len(ids) + len(answer) > max_len:
        raise ExportError(f"{where} is {len(ids) + len(answer)} tokens, more than {limit} {max_len}; shorten it")
    return ids + answer, [IGNORE] * len(ids) + answer


def finetune(source: str | Path, data: str | Path, out: str | Path, options: FinetuneOptions | None = None,
             say: Callable[[str], None] = print) -> Path:
    """Train a LoRA on `data` for `source` (a shipped name, HF folder or GGUF) and save it to `out`."""
    from peft import LoraConfig, get_peft_model

    o = options or FinetuneOptions()
    if o.steps < 1 or o.batch_size < 1 or o.rank < 1 or not (math.isfinite(o.lr) and 0 < o.lr <= 1):
        raise ExportError("--steps, --batch-size and --rank must be >= 1 and --lr a positive number up to 1")
    if not (math.isfinite(o.alpha) and o.alpha > 0):
        raise ExportError(f"--alpha must be a positive number (LoRA's scale is alpha / rank), got {o.alpha}")
    if o.threads is not None and not 1 <= o.threads <= MAX_THREADS:
        raise ExportError(f"--threads must be from 1 to {MAX_THREADS}, got {o.threads}")
    if o.max_len < 2:
        raise ExportError(f"--max-len must be at least 2 (a prompt token and an answer token), got {o.max_len}")
    if not 0 <= o.seed < 2**63:
        raise ExportError(f"--seed must be from 0 to 2**63 - 1, got {o.seed}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ExportError(f"--out {out} is a file; the adapter is saved as a folder")
    examples = read_examples(data)
    if o.threads:
        torch.set_num_threads(o.threads)
    random.seed(o.seed)
    torch.manual_seed(o.seed)
    say(f"loading {source}")
    loaded = load(source)
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ExportError(f"{source} has no chat template to render the examples with")
    positions = family_of(loaded.model).longest_forward() or getattr(loaded.model.config, "max_position_embeddings",
                                                                     None)
    max_len = min(o.max_len, positions) if positions else o.max_len  # past them, transformers' forward fails
    limit = "the model's positions:" if max_len < o.max_len else "--max-len"
    encoded = [encode(tok, m, max_len, f"--data line {n}", limit) for n, m in examples]
    targets = sorted({path.rsplit(".", 1)[-1] for path in family_of(loaded.model).linears})
    config = LoraConfig(task_type="CAUSAL_LM", r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout,
                        target_modules=targets)
    model = get_peft_model(loaded.model, config)
    model.peft_config["default"].base_model_name_or_path = str(source)  # what export checks the base against
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{len(examples)} examples, LoRA r={o.rank} on {', '.join(targets)} ({trainable / 1e6:.2f}M trainable)")

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / o.steps))
    model.train()
    order: list[int] = []
    for step in range(o.steps):
        t = time.perf_counter()
        if len(order) < o.batch_size:
            order += random.sample(range(len(encoded)), len(encoded))
        batch = [encoded[order.pop()] for _ in range(min(o.batch_size, len(encoded)))]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        say(f"step {step + 1}/{o.steps} loss {loss.item():.4f} ({time.perf_counter() - t:.2f}s)")
    model.eval()
    out = Path(out)
    # save_embedding_layers=False: the embeddings are not trained, and "auto" asks the hub about the base
    model.save_pretrained(str(out), save_embedding_layers=False)
    say(f"adapter saved to {out}: edgekit export {source} --adapter {out} --out BUNDLE")
    return out
