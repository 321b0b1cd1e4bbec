"""Prompt-lookup drafts for speculative greedy decoding: the tokens that followed the latest earlier
occurrence of the text's last few tokens, in the prompt or in the output so far. A tuned model
often copies spans of its input (names, numbers, code) and small models repeat themselves; a
draft the model agrees with is verified in one forward instead of one per token."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MAX_NGRAM = 3  # the longest suffix looked up; longer matches predict better, shorter find more
MIN_NGRAM = 2  # one token alone (a space, "the") predicts too little to be worth a draft


class NgramDrafter:
    """The tokens seen so far, indexed by each n-gram (MIN_NGRAM..MAX_NGRAM) → where the tokens
    after its latest occurrence start. Appending a token and drafting are O(1)."""

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self._tokens: list[int] = []
        self._follows: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self._tokens)  # the n-grams ending just before `token` are followed by it
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self._follows[tuple(self._tokens[end - n : end])] = end
            self._tokens.append(token)

    def draft(self, limit: int) -> list[int]:
        """`limit` tokens that followed the longest suffix seen before; [] when none was. The
        suffix itself is not indexed yet (nothing follows it), so a match is always earlier.
        A copy that reaches the end goes on into itself, as an LZ77 match does: a loop of p
        tokens drafts its next turns, not just p tokens."""
        tokens = self._tokens
        end = len(tokens)
        for n in range(min(MAX_NGRAM, end), MIN_NGRAM - 1, -1):
            start = self._follows.get(tuple(tokens[end - n :]))
            if start is not None:
                out = tokens[start : start + limit]
                while len(out) < limit:  # start + len(out) >= end: copy from the draft itself
                    out.append(out[start + len(out) - end])
                return out
        return []


_DECAY = 0.9  # weight of the older evidence at each draft token compared, in `DraftPolicy`


class DraftPolicy:
    """One request's draft sizes. Every step compares the lookup's draft with the tokens the
    model then produced (verified or not, so the evidence is free), and drafts the size (0: none)
    with the most expected tokens per unit of forward cost: a d-token draft yields
    1 + p + ... + p^d tokens when the model agrees with each draft token with probability p.

    The costs are fixed per forward, not timed as it runs: a timed choice would make a greedy
    answer depend on the machine's load (the verifying forward rounds unlike one-token ones)."""

    def __init__(self, costs: Mapping[int, float]) -> None:
        """`costs`: draft size → the cost of its verifying forward, in one-token forwards."""
        self._costs = dict(sorted(costs.items()))
        self._agreed = 0.0  # draft tokens the model agreed with, older ones weighing less
        self._compared = 1.0  # ... and all compared (a prior of one disagreement)

    def size(self, available: int) -> int:
        """The draft size to verify when the lookup offers `available` tokens."""
        p = self._agreed / self._compared
        best, best_rate = 0, 1.0  # no draft: one token per one-token forward
        for d, cost in self._costs.items():
            if d > available:
                break
            rate = sum(p**i for i in range(d + 1)) / cost
            if rate > best_rate:
                best, best_rate = d, rate
        return best

    def observe(self, draft: list[int], produced: list[int]) -> None:
        """The lookup's draft at a step, and the tokens the model produced at that step (the
        accepted draft tokens and its own next one)."""
        for guess, token in zip(draft, produced, strict=False):
            self._agreed = self._agreed * _DECAY + (guess == token)
            self._compared = self._compared * _DECAY + 1
            if guess != token:
                return
