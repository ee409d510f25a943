"""Prompt lookup: draft tokens for greedy decoding from n-grams already in the context.

Extraction, summaries, commands and code repeat the prompt: when the last few tokens occurred
before, the tokens that followed them then are a cheap guess at what follows now (Saxena 2023,
"Prompt Lookup Decoding"; transformers' prompt_lookup_num_tokens). The decode loop feeds the
guess with the sampled token in one model run, keeps the longest prefix the model itself would
have chosen greedily, and drops the rest from the cache: the output is the same tokens, in fewer
runs when guesses hold.

    context ... a b c [x y z] ... a b c ──► draft [x y z]
"""

from __future__ import annotations

NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it never occurred
MIN_NGRAM = 2  # a single repeated token predicts too little to be worth a longer run
MAX_DRAFT = 8
MAX_PAUSE = 16  # steps without drafting after repeated failures, at most


class NgramIndex:
    """Where each n-gram (MIN_NGRAM..NGRAM tokens) of a growing token list was last followed by a token."""

    def __init__(self, tokens: list[int] | None = None):
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.add(tokens or [])

    def add(self, tokens: list[int]) -> None:
        for token in tokens:
            p = len(self.tokens)
            for n in range(MIN_NGRAM, NGRAM + 1):
                if p >= n:  # the n-gram ending just before `token` is now followed by it
                    self._next[tuple(self.tokens[p - n:p])] = p
            self.tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the longest suffix of the tokens the last time it occurred;
        [] when no suffix of MIN_NGRAM or more tokens occurred before."""
        for n in range(NGRAM, MIN_NGRAM - 1, -1):
            start = self._next.get(tuple(self.tokens[-n:])) if len(self.tokens) >= n else None
            if start is not None:
                return self.tokens[start:start + k]
        return []


class Drafter:
    """The drafts of one generation, adapted to how well they hold.

    A draft costs a longer model run whether or not it holds, so its length follows the last
    outcome (doubled when it held whole, one more than what held, halved when nothing did) and a
    draft that failed at once is followed by a pause of 1, 2, 4 ... steps without drafting: on
    text that does not repeat, drafting all but stops.
    """

    def __init__(self, tokens: list[int]):
        self.index = NgramIndex(tokens)
        self.length = MAX_DRAFT // 2
        self.pause = 0  # steps left without drafting
        self.next_pause = 1

    def add(self, tokens: list[int]) -> None:
        self.index.add(tokens)

    def draft(self, limit: int) -> list[int]:
        """A draft of at most `limit` tokens, or [] while paused or when nothing repeats."""
        if self.pause:
            self.pause -= 1
            return []
        return self.index.draft(min(self.length, limit))

    def took(self, drafted: int, held: int) -> None:
        """Record that `held` of a draft's `drafted` tokens were what greedy decoding chose."""
        if held == 0:
            self.length = max(self.length // 2, 1)
            self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE)
            return
        self.next_pause = 1
        self.length = min(2 * drafted, MAX_DRAFT) if held == drafted else held + 1
