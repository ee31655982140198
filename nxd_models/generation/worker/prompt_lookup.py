"""Prompt-lookup proposals (n-gram speculation) for speculative.py: draft tokens without a draft model.

A row's next tokens are guessed by finding its last n tokens earlier in its own text (prompt and
output so far) and proposing what followed them there, as HF's `prompt_lookup_num_tokens` does,
the longest n up to max_ngram first. Unlike HF, the latest earlier occurrence is used, not the
first: text that loops, or that copies the passage it just copied from, continues like its most
recent past (measured on the demo model: a loop went from 12% to 85% of proposed tokens accepted,
a file repeated with edits from 33% to 57%). A continuation that reaches the end of the text goes
on as the repetition it is (period = the distance back to the match).

The target verifies the guess as it would a draft's; a proposal is a certainty (q is one token),
so greedy output is plain greedy output and sampled output keeps the target's distribution.

Free text rarely repeats, and a wrong guess costs a wider verification pass: on the demo model a
pass over 8 positions costs about as much as 3 plain steps. So a round pays when its rows accept
at least PAYS tokens each on average. After one that does not, lookup backs off: the next 1, 4,
16 ... (GROWTH times more each time, at most MAX_BACKOFF) steps decode one token plainly
(speculative.py takes `skip` and runs them in one go), and the round after them is a probe that
proposes at most PROBE tokens (a narrow, cheap pass). On sampled text that never repeats, a
back-off that doubled up to 64 left lookup at 0.89-0.95x of plain decoding (9 failed rounds in 256
tokens); growing 4x up to 128, 0.95-0.96x (6 rounds; benchmarks/speculative.py). A round that pays
restores the full k and clears the back-off. Every decision depends on tokens only, so every rank
makes the same one. The n-grams are indexed as tokens arrive (a dict per n), so a proposal costs a
few dictionary lookups, not a search of the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_BACKOFF = 128
GROWTH = 4  # a round that does not pay multiplies the back-off by this
PAYS = 2  # accepted tokens per proposing row for a round to be worth its pass
PROBE = 2  # tokens proposed by the first round after a back-off


@dataclass
class RowText:
    """One row's tokens and, per n, where each n-gram last occurred with a token after it."""

    tokens: list[int]
    max_ngram: int
    seen: list[dict] = field(default_factory=list)  # seen[n - 1][ngram] = the start of its latest occurrence

    def __post_init__(self):
        self.seen = [{} for _ in range(self.max_ngram)]
        for end in range(1, len(self.tokens)):
            self._index(end)

    def _index(self, end: int) -> None:
        """Record the n-grams that end just before position `end` (they have a token after them)."""
        for n in range(1, min(self.max_ngram, end) + 1):
            self.seen[n - 1][tuple(self.tokens[end - n : end])] = end - n

    def append(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            self._index(len(self.tokens) - 1)

    def continuation(self, k: int) -> list[int]:
        size = len(self.tokens)
        for n in range(min(self.max_ngram, size), 0, -1):
            start = self.seen[n - 1].get(tuple(self.tokens[size - n :]))
            if start is not None:
                begin = start + n  # < size: indexed n-grams have a token after them
                found = self.tokens[begin : begin + k]
                period = size - begin
                while len(found) < k:  # past the end: the text repeats with this period
                    found.append(found[len(found) - period])
                return found
        return []


@dataclass
class PromptLookup:
    rows: list[RowText]
    k: int  # tokens proposed at most per round (prompt_lookup_num_tokens)
    pad_to_k: bool  # a compiled target sees one verification shape: every proposal padded to k
    device: torch.device
    skip: int = 0  # plain steps to take before the next lookup (speculative.py takes them)
    backoff: int = 0  # the length of the last back-off
    probing: bool = False  # the next round proposes at most PROBE tokens
    calls_run: set = field(default_factory=set)  # ("plain", shared slot) and verification widths run (compiled shapes)

    @classmethod
    def start(cls, input_ids, attention_mask, first: torch.Tensor, k: int, max_ngram: int, pad_to_k: bool):
        rows = []
        for ids, mask, token in zip(input_ids.tolist(), attention_mask.tolist(), first.tolist()):
            rows.append(RowText([t for t, m in zip(ids, mask) if m] + [token], max_ngram))
        return cls(rows, k, pad_to_k, input_ids.device)

    def append(self, row: int, tokens: list[int]) -> None:
        self.rows[row].append(tokens)

    def propose(self, finished: list[bool]) -> tuple[torch.Tensor, list[int]] | None:
        """Proposals [batch, j] (rows with less padded with their last token) and each row's real count,
        or None for a plain step (no row found its n-gram)."""
        k = min(PROBE, self.k) if self.probing else self.k
        found = [[] if done else row.continuation(k) for row, done in zip(self.rows, finished)]
        counts = [len(f) for f in found]
        if not any(counts):
            return None
        width = k if self.pad_to_k else max(counts)
        padded = [f + [row.tokens[-1]] * (width - len(f)) for f, row in zip(found, self.rows)]
        return torch.tensor(padded, dtype=torch.long, device=self.device), counts

    def outcome(self, accepted: int, rows: int) -> None:
        """After a lookup round: how many proposed tokens the rows that had a proposal accepted, all together."""
        if accepted >= PAYS * rows:
            self.backoff, self.probing = 0, False
        else:
            self.backoff = min(MAX_BACKOFF, max(1, GROWTH * self.backoff))
            self.skip, self.probing = self.backoff, True
