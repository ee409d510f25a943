"""Text generation from a bundle with a KV cache allocated once.

The cache is one pair of buffers per layer, (1, kv_heads, context_length, head_size); how a
run of the graph reads and writes it depends on the graph's flavour (device/kv_cache.py).
With the fused graph, GroupQueryAttention writes each step's keys and values in place, so a
decode step feeds one token and copies nothing.

    prompt ids ──► run(ids, past=0) ──► logits[-1] ──► sample ──► id
                                                        ▲          │
                  run([id], past=n) ◄──────────────────┴──────────┘   until EOS, stop, or max_new_tokens

A Model keeps the token ids whose keys and values are in its cache, so a prompt
that starts with the previous conversation (a system prompt, earlier turns) only
feeds the new part. A Model is not thread-safe: give each thread its own. One generation at a time:
a stream refuses to go on after another request ran on its Model.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from edgekit.device import chat as chat_format
from edgekit.device import kv_cache
from edgekit.device import tools as tool_calls
from edgekit.device.bundle import BundleError, Manifest, bundle_hash, check_graph, read_manifest
from edgekit.device.constrain import Constraint, ConstraintError, Spec, compile_grammar
from edgekit.device.lookup import Drafter
from edgekit.device.sampling import SamplingConfig, is_unicode, plain_greedy, sample, show_value
from edgekit.device.sampling import top_logprobs as top_logprobs_of
from edgekit.device.session import create_session, release_load_memory, trim_heap
from edgekit.device.threads import MAX_THREADS, ThreadChooser
from edgekit.errors import InputError

log = logging.getLogger("edgekit")
# the compute type of the MatMulNBits onnxruntime fuses from a portable graph's DequantizeLinear + MatMul
QDQ_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


def _valid_text(text: str) -> str:
    """`text`, if it is valid Unicode; a lone surrogate is what Python makes of invalid UTF-8 (argv,
    surrogateescape) and what a JSON "\\udcxx" escape gives, and no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the prompt is not valid text: character {e.start} is a lone surrogate "
                         f"{text[e.start]!r}; pass UTF-8 text") from None
    return text


class Detokenizer:
    """The text of a growing list of tokens, decoding only the last few each time (decoding the whole
    output every token costs more the longer it gets).

    A token's text can depend on the tokens before it (a leading space, a multi-byte character split
    over tokens), so each step decodes from a few tokens back and keeps what that adds. Each decode
    starts with an anchor ("a"): a SentencePiece decoder strips the first space of what it decodes,
    so "▁The" alone is "The" where the text the model (and a grammar) wrote is " The".
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False).ids[-1:]
        self.anchor = anchor if tokenizer.decode(anchor) == "a" else []
        self.tokens: list[int] = []
        self.text = ""
        self.prefix = 0  # tokens before this are settled; decoding starts here
        self.read = 0  # tokens up to here are in self.text

    def add(self, tokens: list[int]) -> str:
        self.tokens += tokens
        decode = self.tokenizer.decode
        before = decode(self.anchor + self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.anchor + self.tokens[self.prefix:], skip_special_tokens=True)
        if after.endswith("\ufffd"):  # an unfinished UTF-8 sequence: show it, settle it later
            return self.text + after[len(before):]
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.tokens)
        return self.text


def _tokens_holding(tokenizer: Tokenizer, tokens: list[int], start: int, stops: list[str]) -> int:
    """The fewest of `tokens` (more than `start`) whose text holds one of `stops`."""
    for n in range(start + 1, len(tokens)):
        text = Detokenizer(tokenizer).add(tokens[:n])
        if any(s in text for s in stops):
            return n
    return len(tokens)


# rows onnxruntime's int8-compute MatMulNBits kernels take together (2 on x86 AVX2, measured; 4 covers
# kernels that take 4, a multiple of 2)
ROW_TILE = 4
# A prompt is fed in runs of at most this many tokens (a multiple of ROW_TILE). A run's memory grows
# with its rows: GroupQueryAttention's scores take rows x heads x context length floats, most of
# them paged in. SmolLM2 int4, peak memory with 512 / 1024 prompt tokens: 219 / 281 MB in one run,
# 197 / 220 MB in runs of 128, at the same TTFT (benchmarks/README.md). The logits are the same: bit
# for bit under int8 compute, within float rounding (1e-7 relative) with fp32 matmuls, whose kernels
# sum a row in another order for another number of rows (as when a prompt reuses cached tokens).
PREFILL_ROWS = 128


def prefill_runs(count: int) -> list[int]:
    """How many tokens each run feeds of a `count`-token prompt: as few runs of at most PREFILL_ROWS
    as can be, of whole row tiles shared out evenly (a run's rows then sit in the kernel's tiles
    where one run over the whole prompt puts them), and no run of one token after another (a
    one-row run takes another kernel)."""
    runs = -(-count // PREFILL_ROWS)
    tiles, rest = divmod(count, ROW_TILE)
    sizes = [ROW_TILE * (tiles // runs + (i < tiles % runs)) for i in range(runs)]
    sizes[-1] += rest
    sizes = [size for size in sizes if size]
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2] += 1
        sizes.pop()
    return sizes


class ContextLengthError(InputError):
    """The prompt does not fit in the bundle's context length."""


@dataclass
class Stats:
    """Where the time of one generation went, in seconds."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV were already in the cache
    new_tokens: int = 0
    tokenize_s: float = 0.0
    prefill_s: float = 0.0  # the model run over the prompt, up to the first logits
    decode_s: list[float] = field(default_factory=list)  # one model run per generated token after the first
    decode_tokens: int = 0  # tokens those runs output: more than runs when a grammar forced some or a draft held
    drafted_tokens: int = 0  # prompt lookup: tokens guessed from the context's n-grams
    accepted_tokens: int = 0  # the guesses greedy decoding agreed with
    sample_s: float = 0.0
    detokenize_s: float = 0.0

    @property
    def time_to_first_token_s(self) -> float:
        return self.tokenize_s + self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.decode_s)
        return (self.decode_tokens or len(self.decode_s)) / total if total else 0.0

    def summary(self) -> str:
        new = self.prompt_tokens - self.cached_tokens
        prefill_tps = new / self.prefill_s if self.prefill_s else 0.0
        return (
            f"prompt {self.prompt_tokens} tok ({self.cached_tokens} cached) | "
            f"ttft {self.time_to_first_token_s * 1e3:.1f} ms | prefill {prefill_tps:.1f} tok/s | "
            f"{self.new_tokens} new tok, decode {self.decode_tokens_per_s:.1f} tok/s"
            + (f" ({self.accepted_tokens}/{self.drafted_tokens} drafted tokens kept)" if self.drafted_tokens else "")
            + " | "
            f"tokenize {self.tokenize_s * 1e3:.2f} ms, sample {self.sample_s * 1e3:.2f} ms"
        )


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    # "eos" | "stop" (a stop string) | "length" (max_new_tokens) | "context" (cache full) | Stream.stop's reason
    finish_reason: str
    stats: Stats
    # constrained generation: whether the text is a whole answer that follows the schema or grammar (False
    # when max_new_tokens, the context or a stop cut it short, or JSON repeats a key: then it must not be
    # used as if it were valid; Constraint.valid)
    valid: bool | None = None
    # with tools: the calls the model made, OpenAI-shaped (device/tools.py); finish_reason "tool_calls"
    tool_calls: list[dict] | None = None
    # with top_logprobs: per generated token {"id", "token", "logprob", "top": [{"id", "token", "logprob"}]}
    logprobs: list[dict] | None = None


class Stream:
    """Iterate for text pieces as they are generated; `completion` is set when done."""

    def __init__(self, steps: Callable[[Stream], Generator[str, None, Completion]]):
        self.completion: Completion | None = None
        self.stop_reason: str | None = None
        self._steps = steps(self)

    def __iter__(self) -> Iterator[str]:
        completion = yield from self._steps
        if self.completion is None:  # a second iteration of a finished stream yields nothing and keeps it
            self.completion = completion

    def stop(self, reason: str = "stopped") -> None:
        """End generation after the current token (e.g. a cancelled request or a passed deadline).

        Iteration then ends, possibly after one last piece of held-back text, and `completion`
        holds the text so far, its usage and timings, with `reason` as its finish reason.
        """
        self.stop_reason = reason


class Model:
    """A bundle opened for generation.

    >>> model = Model("bundles/smollm2")
    >>> model.generate("The capital of France is", max_new_tokens=8).text
    >>> for piece in model.stream([{"role": "user", "content": "Hi"}]): print(piece, end="")

    `threads` fixes onnxruntime's intra-op thread count (0: onnxruntime's choice). Left out, the
    model runs on as many as the cores other processes leave free while it runs, up to one per
    physical core, the target's count and the container's CPU quota, and follows them between
    requests (device/threads.py).
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        context_length: int | None = None,
        verify: bool = True,
        session_config: dict[str, str] | None = None,
        profile_prefix: str | Path | None = None,
    ):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or not 0 <= threads <= MAX_THREADS):
            raise InputError(f"threads must be a whole number from 0 (onnxruntime's choice) to {MAX_THREADS}, "
                             f"got {show_value(threads)}")
        if context_length is not None and (not isinstance(context_length, int) or context_length < 2):
            raise InputError(f"context_length must be a whole number >= 2, got {show_value(context_length)}")
        # Without a thread count, the cores other processes leave free while this one runs
        # (device/threads.py): measured first while the bundle is verified, then during the runs.
        self._chooser = ThreadChooser() if threads is None and profile_prefix is None else None
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path, verify=verify)
        self.bundle_hash = bundle_hash(self.manifest)
        arch = self.manifest.architecture
        self.context_length = min(context_length or arch.context_length, arch.context_length)
        target = self.manifest.target
        self._providers = providers or target.execution_providers or None
        self._session_config = {**target.session_config, **(session_config or {})}
        if self.manifest.graph.flavour == "portable" and target.matmulnbits_accuracy_level is not None:
            # onnxruntime fuses the portable graph's DequantizeLinear + MatMul into MatMulNBits, whose compute
            # type is this entry (its default: 4, int8), not the target's accuracy level the nodes cannot carry
            self._session_config.setdefault(QDQ_ACCURACY_LEVEL,
                                            str(target.matmulnbits_accuracy_level))
        if self._chooser is not None:
            threads = self._chooser.first_choice(most=target.threads)
        self.threads = threads if threads is not None else target.threads  # None or 0: onnxruntime's choice
        # The tokenizer before the session: parsing tokenizer.json takes 3x the memory the tokenizer
        # keeps (SmolLM2: 34 MB, 10 kept), and handed back before the session pre-packs its weights,
        # that transient no longer adds to the session's own (peak 203 -> 188 MB, SmolLM2 int4)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise BundleError(f"{self.path / 'tokenizer.json'}: not a tokenizers file ({str(e)[:200]}); "
                              "the bundle is damaged: copy or export it again") from None
        trim_heap()
        self._open_session(profile_prefix)  # onnxruntime's op profiler, for `edgekit bench --profile-ops`
        if self.provider != "CPUExecutionProvider":
            self._chooser = None  # a GPU's session: the CPU's threads barely matter, and it is slow to make again
        check_graph(self.path, self.manifest, {i.name: i.shape for i in self.session.get_inputs()},
                    {o.name: o.shape for o in self.session.get_outputs()})
        self.chat_template = self._read_chat_template()
        self._arguments_key = tool_calls.arguments_key(self.chat_template)  # a tool call's {"name", key}
        self.eos_token_ids = set(self.manifest.generation.eos_token_ids)

        # The KV cache: allocated once at the context length, in numpy buffers (so a baked-in prefix
        # can be written in) whose pages exist once written; the graph's flavour decides how a run
        # reads and writes it (device/kv_cache.py).
        buffers = kv_cache.buffers_for(arch.num_layers, arch.num_kv_heads, self.context_length, arch.head_size)
        self._kv = kv_cache.for_graph(self.manifest.graph.flavour, self.session, buffers, arch.vocab_size)
        self.prefix_length = self._load_prefix()
        self._cached_ids: list[int] = []  # tokens whose keys/values are in the cache, in order
        self._whole_tiles = 0  # int8 compute: cached rows a prefill computed in whole row tiles (see prefill)
        self._runs = 0  # runs that wrote the cache (and resets): how a stream sees another request come between
        release_load_memory(self.path / "model.onnx.data")  # 12-15 MB of a 230 MB int4 process (session.py)

    def _open_session(self, profile_prefix: str | Path | None = None) -> None:
        """self.session and self.provider for the bundle's graph, on `self.threads`."""
        self.session, self.provider = create_session(self.path / "model.onnx", self._providers, self.threads,
                                                     self._session_config, profile_prefix=profile_prefix)

    def _follow_free_cores(self) -> None:
        """Rebuild the session when the cores other processes leave free have changed (a Model made
        without a thread count; measured over half a second of runs at least). The KV cache and
        its tokens stay."""
        if self._chooser is None or self._chooser.choose() == self.threads:
            return
        buffers = self._kv.buffers
        del self._kv, self.session  # the old session's memory goes back before the new one's comes
        release_load_memory(self.path / "model.onnx.data")
        self.threads = self._chooser.threads
        log.info("the cores other processes leave free have changed: the session is made again")
        self._open_session()
        self._kv = kv_cache.for_graph(self.manifest.graph.flavour, self.session, buffers,
                                      self.manifest.architecture.vocab_size)
        release_load_memory(self.path / "model.onnx.data")

    def _read_chat_template(self) -> str | None:
        """The bundle's chat template (Jinja text), or None when the model has none."""
        name = (self.manifest.chat or {}).get("template")
        if name is None:
            return None
        try:
            return (self.path / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BundleError(f"{self.path / name}: not a readable chat template ({str(e)[:200]}); "
                              "the bundle is damaged: copy or export it again") from None

    def _load_prefix(self) -> int:
        """Write a prefix-tuning adapter's keys and values into cache positions [0, P); returns P.

        Every sequence then starts after them: prompts are fed at positions P, P + 1, ...
        """
        prefix = self.manifest.prefix
        if not prefix:
            return 0
        length = prefix.length
        if length >= self.context_length:
            raise InputError(f"the bundle's {length}-token prefix leaves no room in context length "
                             f"{self.context_length}")
        try:
            with np.load(self.path / prefix.file) as kv:
                for name, buf in self._kv.buffers.items():
                    buf[0, :, :length, :] = kv[name]  # (kv_heads, P, head_size)
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(f"{self.path / prefix.file}: not the prefix this bundle's manifest describes "
                              f"({str(e)[:200]}); export the bundle again") from None
        return length

    # -- the model, one run at a time -------------------------------------------------

    def forward(self, ids: Sequence[int], past_length: int, all_logits: bool = False) -> np.ndarray:
        """Run `ids` after `past_length` cached tokens; returns logits (len(ids) or 1, vocab).

        The new keys and values are written into the cache right after the baked-in prefix
        (if any) and the `past_length` tokens before them; cached tokens from there on are
        forgotten, so a later prompt never reuses keys and values this run overwrote.
        """
        total = self.prefix_length + past_length + len(ids)
        if total > self.context_length:
            raise ContextLengthError(
                f"{total} tokens do not fit in the context length of {self.context_length}"
            )
        del self._cached_ids[past_length:]
        self._runs += 1  # a stream checks it between its runs: no other run may come between
        if self._chooser:
            self._chooser.run_starts()
        logits = self._kv.run(ids, self.prefix_length + past_length, len(ids) if all_logits else 1)
        if self._chooser:
            self._chooser.run_ended()
        return logits

    def prefill(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Bring the cache to hold exactly `ids`, reusing the longest cached prefix.

        Returns the last position's logits (vocab,) and how many tokens came from the cache.
        """
        self._check_fits(len(ids))
        self._follow_free_cores()
        reuse = 0
        limit = min(len(self._cached_ids), len(ids) - 1)  # feed at least one token to get logits
        while reuse < limit and self._cached_ids[reuse] == ids[reuse]:
            reuse += 1
        if not self.exact_multi_token_runs:
            # int8 compute: a row's result depends on where it falls in the kernel's tile of rows, and a
            # one-row run takes another kernel. Reuse only rows a run computed in whole tiles at the
            # offsets a whole-prompt run has, and feed at least two: the logits are then a fresh Model's
            # (SmolLM2 int4: apart by up to 1.14 otherwise, and 8 of 12 greedy chat answers changed)
            reuse = min(reuse, self._whole_tiles, len(ids) - 2)
            reuse = max(0, reuse - reuse % ROW_TILE)
        *first, _ = prefill_runs(len(ids) - reuse)  # the last run is what is left
        start = reuse
        for size in first:
            self.forward(ids[start:start + size], start)
            start += size
        logits = self.forward(ids[start:], start)[-1]
        self._cached_ids = list(ids)
        self._whole_tiles = len(ids) - len(ids) % ROW_TILE
        return logits, reuse

    def _check_fits(self, prompt_tokens: int) -> None:
        """Refuse a prompt of no tokens, or of too many to leave a position to generate into."""
        if prompt_tokens == 0:  # "" or only what the tokenizer drops (some control characters)
            raise InputError("the prompt has no tokens (empty, or only characters the tokenizer drops); "
                             "give it some text")
        room = self.context_length - self.prefix_length
        if prompt_tokens >= room:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens but the context length leaves room for {room - 1}; "
                "shorten the prompt (at least one position must be left to generate into)"
            )

    @property
    def exact_multi_token_runs(self) -> bool:
        """Whether a run over several tokens gives each the logits single steps would: true for fp32
        matmuls; not for int8 compute (MatMulNBits at accuracy_level 4), whose kernels for one row
        and for several differ (measured: logits apart by up to 1.1 on SmolLM2 int4, onnxruntime 1.32)."""
        q = self.manifest.quantization
        # a portable graph has no MatMulNBits of its own: onnxruntime's fused ones compute at the session's level
        level = q.accuracy_level if q.accuracy_level is not None else \
            int(self._session_config.get(QDQ_ACCURACY_LEVEL, 4))
        return q.method == "none" or level < 4

    def _verify(self, tokens: list[int], draft: list[int]) -> tuple[np.ndarray, list[int]]:
        """Feed `tokens` then `draft` in one run; keep the draft's longest prefix that greedy decoding
        would choose itself. Returns the logits after the last kept token and that prefix; the
        rest of the draft is dropped from the cache (its positions are written again later)."""
        base = len(self._cached_ids)
        rows = self.forward(tokens + draft, base, all_logits=True)  # (len(tokens) + len(draft), vocab)
        greedy = rows[len(tokens) - 1:].argmax(-1)  # the token greedy picks after each fed position
        agreed = 0
        while agreed < len(draft) and greedy[agreed] == draft[agreed]:
            agreed += 1
        self._cached_ids.extend(tokens + draft[:agreed])
        return rows[len(tokens) - 1 + agreed], draft[:agreed]

    def step(self, token_id: int) -> np.ndarray:
        """Feed one token after the cached ones; logits (vocab,)."""
        return self._feed([token_id])

    def _feed(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens after the cached ones in one run; the last position's logits (vocab,)."""
        logits = self.forward(tokens, len(self._cached_ids))[-1]
        self._cached_ids.extend(tokens)
        return logits

    def reset(self) -> None:
        """Forget the cached tokens (the next prompt is computed from scratch)."""
        self._cached_ids = []
        self._runs += 1

    @property
    def positions_left(self) -> int:
        """How many more tokens fit in the cache: the context length less the prefix and the cached tokens.

        A step() needs one; prefill() and forward() start from the cached tokens they reuse.
        """
        return self.context_length - self.prefix_length - len(self._cached_ids)

    # -- text in, text out ----------------------------------------------------------

    def encode(self, prompt: str | Sequence[dict], tools: list[dict] | None = None,
               chat_template_kwargs: dict | None = None) -> list[int]:
        """Token ids for a plain prompt (with the tokenizer's special tokens) or a chat conversation,
        rendered with the model's chat template, `tools` and the template's variables.

        Raises ValueError for a prompt or message that is not valid Unicode text (a lone surrogate).
        """
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise InputError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        chat_format.check_variables(chat_template_kwargs or {})
        if isinstance(prompt, str):
            if tools:
                raise chat_format.ChatFormatError("tools go with a chat conversation, not a plain prompt")
            return self.tokenizer.encode(_valid_text(prompt)).ids
        if not isinstance(prompt, (list, tuple)):
            raise InputError(f"the prompt must be text or a list of chat messages, got {type(prompt).__name__}")
        chat = self.manifest.chat
        if chat is None:
            raise chat_format.ChatFormatError("this bundle's model has no chat template; pass a plain prompt "
                                              "(or export it with --chat-template)")
        messages = list(prompt)
        chat_format.check_messages(messages)
        knows_tools = self.chat_template is None or "tools" in self.chat_template  # None: edgekit 0.1 refuses tools
        messages = tool_calls.earlier_calls(messages, knows_tools)

        def render(messages: list[dict], tools: list[dict] | None) -> str:
            return chat_format.render(chat, messages, add_generation_prompt=True,
                                      template=self.chat_template, tools=tools, **(chat_template_kwargs or {}))

        if tools and not knows_tools:  # the template cannot list the tools: a system message tells them
            try:
                text = render(tool_calls.told(messages, tools, "system"), None)
            except chat_format.ChatFormatError:  # a template with no system role: the first user message
                text = render(tool_calls.told(messages, tools, "user"), None)
        else:
            text = render(messages, tools)
        return self.tokenizer.encode(_valid_text(text), add_special_tokens=False).ids

    def stream(
        self,
        prompt: str | Sequence[dict],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = (),
        json_schema: dict | str | None = None,
        regex: str | None = None,
        grammar: str | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict = "auto",
        chat_template_kwargs: dict | None = None,
        min_p: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: dict[int, float] | None = None,
        top_logprobs: int | None = None,
        prompt_lookup: bool | None = None,
    ) -> Stream:
        """Generate from `prompt` (text, or a list of chat messages), yielding text as it comes.

        Settings left as None take the bundle's generation defaults. With `json_schema` (a dict or
        its JSON text), `regex` or `grammar` (Lark, as llguidance reads it), at most one, the output
        is constrained to it: the completion is then `valid` unless a limit cut it short. Raises
        ContextLengthError before any work when the prompt does not fit, InputError when it has no
        tokens or a `stop` string is empty, ConstraintError when the schema or grammar cannot be used.

        With `tools` (OpenAI-shaped functions) the model may call one (`tool_choice` "auto"), must
        ("required", or {"type": "function", "function": {"name": N}}) or may not ("none"); a call is
        constrained to a tool's name and parameters schema, and parsed into `completion.tool_calls`.
        `chat_template_kwargs` go to the chat template (Qwen3: {"enable_thinking": False}).

        `prompt_lookup`: greedy decoding without penalties, bias, constraint or log-probabilities
        drafts tokens from n-grams already in the context and verifies them in the run of the
        sampled token (device/lookup.py), in fewer model runs when the answer repeats the prompt.
        None (the default) does so when the verifying run computes what single steps compute
        (fp32 matmuls: the same tokens); int8-compute bundles (int4 weights at MatMulNBits
        accuracy_level 4) round differently in a multi-token run, so there it is opt-in (True):
        as greedy, but not always the same tokens as one step at a time. False: never.
        `top_logprobs` N: each sampled token's log-probability and the model's N likeliest tokens go to
        `completion.logprobs` (tokens a grammar forced have none: the model did not choose them).
        """
        spec = Spec.of(json_schema, regex, grammar)
        if tools is None and tool_choice != "auto":
            raise InputError(f"tool_choice {tool_choice!r} needs tools")
        if tools is not None:
            tools = tool_calls.check_tools(tools)
            if spec is not None:
                raise ConstraintError("tools and a json_schema, regex or grammar do not combine: a call is "
                                      "constrained to its tool's parameters")
            spec = tool_calls.constraint_for(tools, tool_choice, self._arguments_key)
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s and is_unicode(s) for s in stops):  # "" would cut every answer at once
            raise InputError(f"stop must be a non-empty string of valid text or a list of them, got {show_value(stop)}")
        gen = self.manifest.generation
        # Any: an int (top_k) among floats, each checked by SamplingConfig as a caller gave it
        given: dict[str, Any] = {
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty,
            "min_p": min_p, "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty}
        cfg = SamplingConfig(seed=seed, logit_bias=logit_bias, **{  # settings not given take the bundle's defaults
            k: v if v is not None else getattr(gen, k) for k, v in given.items() if v is not None or hasattr(gen, k)})
        vocab = self.manifest.architecture.vocab_size
        if cfg.logit_bias and max(cfg.logit_bias) >= vocab:
            raise InputError(f"logit_bias names token {show_value(max(cfg.logit_bias))}; "
                             f"this model's vocabulary has {vocab} (ids 0 to {vocab - 1})")
        if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                         or not 0 <= top_logprobs <= 20):
            raise InputError(f"top_logprobs must be an integer from 0 to 20, got {show_value(top_logprobs)}")
        max_new = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {show_value(max_new)}")
        if prompt_lookup is not None and not isinstance(prompt_lookup, bool):
            raise InputError(f"prompt_lookup must be True, False or None, got {show_value(prompt_lookup)}")
        constraint = None if spec is None else Constraint(self.guide_tokenizer, compile_grammar(
            spec, self.guide_tokenizer), json_text=tools is not None or spec.json_schema is not None)
        stats = Stats()
        t0 = time.perf_counter()
        ids = self.encode(prompt, tools, chat_template_kwargs)
        stats.tokenize_s = time.perf_counter() - t0
        self._check_fits(len(ids))  # here, before any work: not mid-stream
        if prompt_lookup is None:
            prompt_lookup = self.exact_multi_token_runs
        lookup = prompt_lookup and plain_greedy(cfg) and constraint is None and top_logprobs is None
        return Stream(lambda s: self._generate(ids, cfg, max_new, stops, stats, s, constraint, tools is not None,
                                               top_logprobs, lookup))

    @functools.cached_property
    def guide_tokenizer(self):
        """llguidance's view of the bundle's tokenizer (built once, about 0.4 s for 49k tokens)."""
        from llguidance import LLTokenizer

        n = self.manifest.architecture.vocab_size
        return LLTokenizer(str(self.path / "tokenizer.json"), n_vocab=max(n, self.tokenizer.get_vocab_size()),
                           eos_token=sorted(self.eos_token_ids) or None)

    def generate(self, prompt: str | Sequence[dict], **kwargs) -> Completion:
        """Generate from `prompt` and return the whole completion; takes the same settings as stream()."""
        s = self.stream(prompt, **kwargs)
        for _ in s:
            pass
        assert s.completion is not None
        return s.completion

    def _generate(self, ids: list[int], cfg: SamplingConfig, max_new: int, stop: list[str], stats: Stats,
                  stream: Stream, constraint: Constraint | None, with_tools: bool = False,
                  top_logprobs: int | None = None, lookup: bool = False) -> Generator[str, None, Completion]:
        """The decode loop: sample, check, yield text, feed the token (and any the grammar forces).

            logits ──► [mask to the grammar] ──► sample ──► EOS? stop string? limits? ──► feed [token, *forced]
                                                                                             [+ draft, verified]

        With `lookup` (plain greedy), the run that feeds the token also feeds a draft from the
        context's n-grams; the draft's prefix the model agrees with is output next without a run.
        """
        rng = np.random.default_rng(cfg.seed)
        stats.prompt_tokens = len(ids)
        t0 = time.perf_counter()
        logits, stats.cached_tokens = self.prefill(ids)
        stats.prefill_s = time.perf_counter() - t0
        runs = self._runs  # the cache holds this generation's tokens while no other run has written it

        seen = np.array(ids, dtype=np.int64) if cfg.repetition_penalty != 1.0 else np.empty(0, np.int64)
        out: list[int] = []
        logprobs: list[dict] | None = [] if top_logprobs is not None else None
        emitted = 0  # characters of text already yielded
        hold = max((len(s) for s in stop), default=1) - 1  # hold back what may be the start of a stop string
        finish = "length"
        text = ""
        detok = Detokenizer(self.tokenizer)
        feed: list[int] = []
        if constraint:
            feed = constraint.force()  # the grammar may fix the first tokens
        drafter = Drafter(ids) if lookup else None
        in_cache = False  # feed's keys and values are already cached: a draft the model agreed with
        while True:
            if not feed:
                t = time.perf_counter()
                if constraint:
                    if constraint.finished:  # complete: only EOS could follow
                        finish = "eos"
                        break
                    raw = logits.copy() if logprobs is not None else logits
                    constraint.mask(logits)
                else:
                    raw = logits
                token = sample(logits, cfg, rng, seen, np.asarray(out, np.int64))
                stats.sample_s += time.perf_counter() - t
                if token in self.eos_token_ids:  # not an answer token: no entry in token_ids or logprobs
                    finish = "eos"
                    break
                if logprobs is not None:
                    assert top_logprobs is not None  # logprobs are kept only when asked for
                    logprobs.append(self._logprob(raw, token, top_logprobs))
                feed = [token]
                if constraint:
                    constraint.consume(feed)
                    feed += constraint.force()
            left = max_new - len(out)
            if constraint and len(feed) > left:  # forced tokens past max_new_tokens: the grammar forgets them too
                constraint.rollback(len(feed) - left)
            feed = feed[:left]
            if logprobs is not None:  # tokens a grammar forced: the model did not choose them
                logprobs += [{"id": i, "token": self.tokenizer.id_to_token(i), "logprob": None, "top": []}
                             for i in feed[len(logprobs) - len(out):]]
            out += feed
            if cfg.repetition_penalty != 1.0:
                seen = np.append(seen, feed)

            t = time.perf_counter()
            text = detok.add(feed)
            stats.detokenize_s += time.perf_counter() - t
            cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                finish = "stop"
                if len(feed) > 1:  # a draft (or forced tokens) past the stop: keep what one at a time would
                    del out[_tokens_holding(self.tokenizer, out, len(out) - len(feed), stop):]
                    if logprobs is not None:
                        del logprobs[len(out):]
                break
            # hold back what may start a stop string, before an incomplete UTF-8 sequence (which waits too)
            ready = len(text) - hold - int(text.endswith("\ufffd"))
            if ready > emitted:
                yield text[emitted:ready]
                emitted = ready
            if stream.stop_reason:
                finish = stream.stop_reason
                break
            if len(out) >= max_new:
                break
            if drafter is not None:
                drafter.add(feed)
            if in_cache:  # a draft the model agreed with: its logits came with the run that verified it
                in_cache, feed = False, []
                continue
            if self.prefix_length + len(self._cached_ids) + len(feed) >= self.context_length:
                finish = "context"
                break
            # as the check above: a run never fills the cache's last position
            room = self.context_length - self.prefix_length - len(self._cached_ids) - len(feed) - 1
            draft = drafter.draft(min(room, max_new - len(out))) if drafter is not None else []
            draft = list(itertools.takewhile(lambda i: i not in self.eos_token_ids, draft))
            if self._runs != runs:
                raise InputError("this Model ran another request since this stream began, so its cache no longer "
                                 "holds this stream's text: read a stream to its end (or stop it) before the next")
            t = time.perf_counter()
            if drafter is not None and draft:
                logits, agreed = self._verify(feed, draft)
                stats.drafted_tokens += len(draft)
                stats.accepted_tokens += len(agreed)
                drafter.took(len(draft), len(agreed))
            else:
                logits, agreed = self._feed(feed), []  # the sampled token and what the grammar forces: one run
            stats.decode_s.append(time.perf_counter() - t)
            runs = self._runs
            stats.decode_tokens += len(feed) + len(agreed)
            feed, in_cache = agreed, bool(agreed)
        if len(text) > emitted:
            yield text[emitted:]
        stats.new_tokens = len(out)
        valid = None if constraint is None else constraint.valid(text, finish)
        calls = tool_calls.parse_calls(text, self._arguments_key) if with_tools and valid else None
        if calls:
            finish = "tool_calls"
        return Completion(text=text, token_ids=out, finish_reason=finish, stats=stats, valid=valid, tool_calls=calls,
                          logprobs=logprobs)

    def _logprob(self, logits: np.ndarray, token: int, n: int) -> dict:
        """A sampled token's entry of completion.logprobs."""
        lp, top = top_logprobs_of(logits, token, n)
        name = self.tokenizer.id_to_token
        return {"id": token, "token": name(token), "logprob": lp,
                "top": [{"id": i, "token": name(i), "logprob": p} for i, p in top]}
