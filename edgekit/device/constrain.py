"""Output constrained to a JSON schema, a regular expression or a Lark grammar.

The engine is llguidance (what onnxruntime-genai and llama.cpp use): it reads the bundle's
tokenizer.json and computes, for each step, which tokens keep the output inside the grammar,
in Rust, with no torch. A wheel exists for x86-64 and aarch64 Linux (glibc 2.31+: Raspberry Pi
OS bookworm, JetPack 5/6), so it is an ordinary dependency of the device side.

    logits ──► mask (tokens the grammar allows; EOS once it is complete) ──► sample ──► consume
    forced  ──► the tokens the grammar fixes from here (`{"action":"`) are fed to the model in one run

A Constraint is one request's state; the tokenizer it needs is built once per Model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.device.sampling import is_unicode
from edgekit.errors import InputError

MAX_GRAMMAR_BYTES = 1 << 20  # a schema or grammar larger than this is refused before compiling
# the "format"s llguidance enforces; it refuses every other (OpenAPI's int32, double, binary, JSON Schema's
# uri-reference, regex, ...), which JSON Schema makes annotations unless a validator opts in
ENFORCED_FORMATS = frozenset({"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid",
                              "uri"})
DATA_KEYWORDS = ("const", "enum", "default", "examples")  # keywords whose values are JSON data, not schemas
MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema

log = logging.getLogger("edgekit")


class ConstraintError(InputError):
    """A schema, regex or grammar that cannot constrain generation; said before any generation."""


@dataclass(frozen=True)
class Spec:
    """What to constrain to: exactly one of the three."""

    json_schema: dict | str | bool | None = None  # a bool is JSON Schema's "anything" (true) or "nothing" (false)
    regex: str | None = None
    grammar: str | None = None  # Lark syntax, as llguidance reads it (may embed %json {...})

    @staticmethod
    def of(json_schema: Any = None, regex: Any = None, grammar: Any = None) -> Spec | None:
        """The Spec for the arguments given (None when none is), refusing more than one."""
        given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
                 if v is not None]
        if not given:
            return None
        if len(given) > 1:
            raise ConstraintError(f"give at most one of json_schema, regex and grammar (got {', '.join(given)})")
        if regex is not None and not isinstance(regex, str) or grammar is not None and not isinstance(grammar, str):
            raise ConstraintError(f"{given[0]} must be a string")
        if json_schema is not None and not isinstance(json_schema, (dict, str, bool)):
            raise ConstraintError("json_schema must be a JSON object (a dict) or its JSON text")
        text = next(v for v in (json_schema, regex, grammar) if v is not None)
        if isinstance(text, str) and not is_unicode(text):  # llguidance takes UTF-8: a lone surrogate has none
            raise ConstraintError(f"{given[0]} is not valid Unicode text (it holds a lone surrogate)")
        return Spec(json_schema, regex, grammar)

    def describe(self) -> str:
        return "a JSON schema" if self.json_schema is not None else "a regex" if self.regex is not None \
            else "a grammar"


def compile_grammar(spec: Spec, tokenizer) -> str:
    """llguidance's grammar for `spec`, checked against `tokenizer` (an LLTokenizer); ConstraintError
    with llguidance's own message when it cannot be used."""
    from llguidance import LLMatcher

    if spec.json_schema is not None:
        schema = spec.json_schema
        if isinstance(schema, str):
            if len(schema) > MAX_GRAMMAR_BYTES:
                raise ConstraintError(f"the JSON schema is larger than {MAX_GRAMMAR_BYTES} bytes")
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as e:  # ValueError: not JSON, or an integer of > 4300 digits
                raise ConstraintError(f"the JSON schema is not valid JSON ({str(e)[:200]})") from None
        if schema is False:
            raise ConstraintError("the JSON schema false admits no value: no text satisfies it")
        if schema is True:  # JSON Schema's "anything": any JSON value
            schema = {}
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object")
        try:
            text = json.dumps(schema)
        except (RecursionError, ValueError, TypeError) as e:
            raise ConstraintError(f"the JSON schema cannot be serialized ({str(e)[:200]})") from None
        if len(text) > MAX_GRAMMAR_BYTES:
            raise ConstraintError(f"the JSON schema is larger than {MAX_GRAMMAR_BYTES} bytes")
        text = json.dumps(annotated_formats_dropped(schema))
        try:  # compact JSON (no free whitespace: a small model would wander in it); "x-guidance" in a schema overrides
            grammar = LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise ConstraintError(f"the JSON schema cannot be used: {str(e)[:300]}") from None
    elif spec.regex is not None:
        grammar = LLMatcher.grammar_from_regex(spec.regex)
    else:
        assert spec.grammar is not None  # Spec.of gives exactly one of the three
        if len(spec.grammar) > MAX_GRAMMAR_BYTES:
            raise ConstraintError(f"the grammar is larger than {MAX_GRAMMAR_BYTES} bytes")
        grammar = LLMatcher.grammar_from_lark(spec.grammar)
    error = LLMatcher.validate_grammar(grammar, tokenizer)
    if error and not error.startswith("WARNING"):
        raise ConstraintError(f"{spec.describe()} that cannot constrain generation: "
                              + " ".join(error.split())[:400])
    return grammar


DESCEND, DROP = object(), object()  # what a rewrite_schema keyword function returns besides a new value


def rewrite_schema(schema: Any, keyword: Callable[[str, Any], Any]) -> Any:
    """`schema` rebuilt with `keyword(key, value)` applied to every keyword of it and of its subschemas:
    it returns the keyword's new value, DROP to leave it out, or DESCEND to rewrite its value as a
    subschema. Data keywords (const, enum, ...) are kept as they are; a map's (properties, $defs,
    ...) values are subschemas, its keys names (a property may be named "format" or "$ref").
    ConstraintError for a schema nested too deeply to walk."""
    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            new = value if key in DATA_KEYWORDS else keyword(key, value)
            if new is DESCEND:
                new = {name: walk(v) for name, v in value.items()} if key in MAP_KEYWORDS and isinstance(
                    value, dict) else walk(value)
            if new is not DROP:
                out[key] = new
        return out

    try:
        return walk(schema)
    except RecursionError:
        raise ConstraintError("the JSON schema is nested too deeply") from None


def annotated_formats_dropped(schema: Any) -> Any:
    """`schema` without the "format"s llguidance does not enforce (ENFORCED_FORMATS has those it does),
    which it would refuse: a validator may treat them as annotations, and here they are (logged)."""
    dropped: list[str] = []

    def keyword(key: str, value: Any) -> Any:
        if key == "format" and isinstance(value, str) and value not in ENFORCED_FORMATS:
            dropped.append(value)
            return DROP
        return DESCEND

    out = rewrite_schema(schema, keyword)
    if dropped:
        log.warning("JSON schema: format %s not enforced (llguidance enforces %s)",
                    ", ".join(sorted(set(dropped))), ", ".join(sorted(ENFORCED_FORMATS)))
    return out


class Constraint:
    """One generation's grammar state: which tokens may come next, and which are forced."""

    def __init__(self, tokenizer, grammar: str, json_text: bool = False):
        """`json_text`: the whole output is one JSON value (a schema's, a tool call), see `valid`."""
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self.tokenizer = tokenizer
        self.json_text = json_text
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar cannot start: {_why(self.matcher)}")
        self.bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        # validate_grammar passes a grammar no text satisfies ('start: a\na: a', a regex of an empty
        # class) and forced text that spells a special token: found here, on a copy, before any generation
        probe = self.matcher.deep_copy()
        forced = probe.compute_ff_tokens()
        taken = probe.try_consume_tokens(forced) if forced else 0
        if taken < len(forced) and tokenizer.is_special_token(forced[taken]):
            raise self._spells_special(forced[taken])
        self._allowed(probe)

    def force(self) -> list[int]:
        """Consume and return the tokens the grammar fixes from here (possibly none).

        llguidance finds them by tokenizing the forced text, which turns text that spells a
        special token ('<|im_end|>' in a regex) into that token, which the grammar then refuses:
        only the prefix it takes is forced."""
        forced = self.matcher.compute_ff_tokens()
        return forced[:self.matcher.try_consume_tokens(forced)] if forced else []

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` (vocab,) with every token the grammar does not allow set to -inf, in place."""
        allowed = self._allowed(self.matcher)
        n = min(len(logits), len(allowed))
        logits[:n][~allowed[:n]] = -np.inf
        logits[n:] = -np.inf  # rows past the tokenizer's vocabulary (padding) are never text
        return logits

    def _allowed(self, matcher) -> np.ndarray:
        """(tokenizer vocab,) bool: the tokens `matcher` takes next; ConstraintError when there is none."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(matcher, self.bitmask, 0)
        if matcher.is_error():  # no token may follow: the grammar's language is empty (from here)
            raise ConstraintError(f"no text satisfies this constraint: {_why(matcher)}")
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:self.tokenizer.vocab_size] \
            .astype(bool)
        ids = np.flatnonzero(allowed)
        if len(ids) <= 8:  # text the grammar forces: the mask holds the token that spells it, a special one too
            done = matcher.is_accepting()  # then EOS ends the text (validate_tokens takes no EOS once stopped)
            refused = [int(i) for i in ids
                       if not (done and int(i) in self.tokenizer.eos_tokens) and not matcher.validate_tokens([int(i)])]
            allowed[refused] = False
            if not allowed.any():
                raise self._spells_special(refused[0])
        return allowed

    def _spells_special(self, token: int) -> ConstraintError:
        name = self.tokenizer.decode_bytes([token]).decode("utf-8", "replace")
        return ConstraintError(f"the constraint spells the special token {name!r} as text, which no text can "
                               "be: take it out of the schema, regex or grammar")

    def consume(self, tokens: list[int]) -> None:
        if not self.matcher.consume_tokens(tokens):
            raise ConstraintError(f"the grammar refused a token it allowed: {_why(self.matcher)}")

    def rollback(self, n: int) -> None:
        """Forget the last `n` tokens consumed: forced tokens that a limit kept out of the output."""
        if n and not self.matcher.rollback(n):
            raise ConstraintError(f"the grammar cannot take back {n} tokens: {_why(self.matcher)}")

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def valid(self, text: str, finish_reason: str) -> bool:
        """Whether `text`, generated under this constraint and ended for `finish_reason`, is a whole
        answer that follows it. A text the grammar accepts but that a limit cut ('12' of '1234567')
        is not; nor is JSON that repeats a key (llguidance tracks only the properties a schema names,
        so {"a":1,"a":2} passes patternProperties and minProperties 2; json.loads keeps one)."""
        whole = finish_reason == "eos" or finish_reason != "stop" and self.finished  # "stop": the text was cut
        return whole and not (self.json_text and repeats_a_key(text))


def repeats_a_key(text: str) -> bool:
    """Whether the JSON `text` has an object that names a key twice."""
    class Repeated(Exception):
        pass

    def pairs(items: list[tuple[str, Any]]) -> dict:
        if len({k for k, _ in items}) < len(items):
            raise Repeated
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=pairs)
    except Repeated:
        return True
    except (ValueError, RecursionError):  # not JSON (an answer in words), or beyond what Python parses
        pass
    return False


def _why(matcher) -> str:
    """llguidance's error on one line, without the parser state it dumps after it."""
    return " ".join(matcher.get_error().split("<state>")[0].split())[:300]
