"""Speculative decoding inside the workers (Leviathan et al. 2023), with a draft model or prompt lookup.

Each round the draft proposes k tokens, one at a time (or prompt_lookup.py
proposes up to k from the row's own text); the target scores all of them in
one pass; each row keeps the longest accepted prefix plus one token from the
target (a correction, or a bonus when all were accepted).

- Greedy: a draft token is accepted when it is the target's argmax, so the
  output is exactly the target's greedy output.
- Sampling: accepted with probability min(1, p/q); on rejection the token is
  drawn from norm(max(p - q, 0)). The output is distributed as the target's.
  A lookup proposal is certain (q is one token): accepted with probability p,
  and on rejection drawn from p without it.

Rows of a batch accept different numbers of tokens, so every row has its own
KV-cache slot pointer (`pos`). Both models always hold the same tokens at the
same slots ([last, d1..dk] are written by both each round); rolling a row back
is moving its pointer: the slots past it are never attended (causal over
slots) and are overwritten next round. With prompt lookup only the target
has a cache, and a round with nothing to propose is a plain one-token step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nxd_core.worker_process import StateKey, worker_state

from ...worker_ops import device_of, end_session, owned_key
from .compiling import CachedSteps, cached_step
from .decoding import as_compute, decode_step, forward_step, guarded_call, prefill, validity_mask
from .prompt_lookup import PromptLookup
from .sampling import SamplingParams, next_tokens, probabilities, seeded_generator

SESSION = "speculative"  # the worker_state() kind of a speculative generation in flight, owned by the target


@dataclass
class SpeculativeSession:
    valid: torch.Tensor  # [batch, max_seq_len]: 0 on the prompt's left padding, 1 elsewhere
    pos: torch.Tensor  # [batch] the next slot each row writes
    last: torch.Tensor  # [batch] the last chosen token, not yet fed to either model
    finished: torch.Tensor  # [batch] bool
    emitted: torch.Tensor  # [batch] tokens produced so far
    params: SamplingParams
    generator: torch.Generator | None
    eos: torch.Tensor
    k: int
    max_new_tokens: int
    draft: Callable | None = None  # the draft's and the target's compute (model.compute, or its compiled version)
    target: Callable | None = None
    lookup: PromptLookup | None = None  # prompt lookup's proposals, in place of a draft
    plain_step: Callable | None = None  # prompt lookup's one-token step: plain decoding's (compiled) step
    verify: Callable | None = None  # greedy: the target's pass and the acceptance in one (compiled) call
    greedy_draft: Callable | None = None  # greedy with a draft: its k steps in one (compiled) call
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)  # histogram: rounds (per row) that accepted i proposed tokens
    proposed: int = 0  # tokens proposed, over all rows and rounds (lookup proposes fewer than k at times)
    eos_ids: frozenset = field(init=False)  # eos as a set, for _emit (made once: a round's Python costs as much as its tensor ops)

    def __post_init__(self):
        self.eos_ids = frozenset(self.eos.tolist())


def _slots(session: SpeculativeSession, offsets):
    """The cache slots of each row's next tokens, pos + offsets: [batch, j], or [j] at batch 1, where
    the model takes its shared-slot path (one index_copy per cache, as plain decoding does)."""
    if session.pos.shape[0] == 1:
        return session.pos + offsets
    return session.pos[:, None] + offsets


def greedy_draft(compute: Callable, last, valid, slots, k: int):
    """The draft's k greedy tokens [batch, k], k + 1 steps unrolled in one function: compiled, a round's
    drafting is one call. slots: [batch, 1] or [1] (batch 1), the slot of `last`; the draft also
    consumes its k-th token, so that its cache holds the same slots as the target's."""
    token, tokens = last, []
    for j in range(k + 1):
        logits = compute(token[:, None], valid, position_ids=None, cache_position=slots + j, last_only=True)[:, -1]
        if j < k:
            token = logits.argmax(dim=-1)
            tokens.append(token)
    return torch.stack(tokens, dim=1)


def draft_round(model, last, valid, slots, k: int):
    """greedy_draft on the model's compute, as a function of the model: what the compile cache
    compiles ahead of time (see decoding.greedy_step)."""
    return greedy_draft(model.compute, last, valid, slots, k)


def _draft_tokens(session: SpeculativeSession):
    """k draft tokens [batch, k] and their distributions [batch, k, vocab] (None when greedy).

    The draft also consumes its k-th token, so that its cache holds the same slots as the target's.
    """
    trusted = session.rounds > 0  # every draft round has the same shapes
    if session.greedy_draft is not None:
        return guarded_call(trusted, session.greedy_draft, session.last, session.valid, _slots(session, 0), session.k), None
    token, tokens, dists = session.last, [], []
    for j in range(session.k + 1):
        slots = _slots(session, j)
        logits = guarded_call(
            trusted, session.draft, token[:, None], session.valid, position_ids=None, cache_position=slots, last_only=True
        )[:, -1]
        if j == session.k:
            break
        if session.params.do_sample:
            q = probabilities(logits, session.params)
            token = torch.multinomial(q, 1, generator=session.generator).squeeze(-1)
            dists.append(q)
        else:
            token = logits.argmax(dim=-1)
        tokens.append(token)
    return torch.stack(tokens, dim=1), (torch.stack(dists, dim=1) if dists else None)


def _accept(session: SpeculativeSession, drafted: torch.Tensor, q, target_logits: torch.Tensor):
    """Sampling, per row: how many draft tokens are accepted [batch], and the target's next token
    [batch] (greedy acceptance is greedy_verify's). q: the draft's distributions [batch, k, vocab],
    or None for proposals that are certainties (prompt lookup: q one-hot on each proposed token),
    taken as that one-hot q without building it at the vocabulary's size (the same draws from the
    same values: u * 1 is u, p - 1 clamps to 0, p - 0 is p), in fewer eager ops: a sampled lookup
    round that finds nothing to accept is what speculation costs on text that does not repeat."""
    batch, k = drafted.shape
    p = probabilities(target_logits, session.params)  # [batch, k + 1, vocab]
    p_drafted = p[:, :k].gather(-1, drafted[..., None]).squeeze(-1)
    u = torch.rand(batch, k, generator=session.generator, device=p.device)
    if q is not None:  # u < p/q, without dividing by 0
        u = u * q.gather(-1, drafted[..., None]).squeeze(-1)
    accepted = (u < p_drafted).long().cumprod(dim=1).sum(dim=1)
    rows, stopped = torch.arange(batch, device=p.device), accepted.clamp(max=k - 1)
    stop = p[rows, accepted]  # the target's distribution where each row stops
    if q is None:
        residual = stop.scatter(-1, drafted[rows, stopped][:, None], 0.0)
    else:
        residual = (p[rows, stopped] - q[rows, stopped]).clamp(min=0)
    # All accepted: the bonus token from p; a residual that rounds to nothing (draft == target) falls
    # back to the target's own distribution too.
    keep = (accepted == k) | (residual.sum(dim=-1) <= 0)
    dist = torch.where(keep[:, None], stop, residual)
    return accepted, torch.multinomial(dist, 1, generator=session.generator).squeeze(-1)


def _plain_steps(session: SpeculativeSession, n: int) -> list[list[int]]:
    """Prompt lookup with nothing to propose: n tokens per row through plain decoding's step (its
    compiled step, token choice included), with as little around each step as plain decoding has:
    every row's slot moves on by one (a finished row's slots are never read again: _advance), and the tokens
    are sorted out after the last step."""
    lookup = session.lookup
    room = [session.max_new_tokens - e for e, done in zip(session.emitted.tolist(), session.finished.tolist()) if not done]
    n = max(1, min([n, *room]))
    # Rows at the same slot (always, at batch 1) take the model's shared-slot path, plain decoding's.
    shared = session.pos.shape[0] == 1 or bool((session.pos == session.pos[0]).all())
    call = ("plain", shared)
    # Every step's slots at once, [n, batch], clamped as _advance clamps (moving the pointers once per
    # step cost 3% of a small model's step); a step's are sliced as plain decoding's ([1] when shared,
    # else [batch, 1]), with the same strides, which the compiled step's guards expect.
    ahead = torch.arange(n, device=session.pos.device)[:, None]
    positions = (session.pos + ahead).clamp(max=session.valid.shape[1] - 1 - session.k)
    last, finished, steps = session.last, session.finished, []
    for i in range(n):
        position = positions[i, :1] if shared else positions[i][:, None]
        last, finished = guarded_call(call in lookup.calls_run, session.plain_step, last, session.valid, position, finished)
        lookup.calls_run.add(call)
        steps.append(last)
    _advance(session, n)
    session.last = last
    return _emit(session, torch.stack(steps, dim=1).tolist(), [0] * last.shape[0])


def _advance(session: SpeculativeSession, by) -> None:
    """Move each row's slot pointer on by `by`, to at most the last slot a round can start from (k + 1
    slots before the cache's end). Only rows that have finished ever reach it (generate checks that
    prompt + max_new_tokens + k fits): a row that finishes in a round moves on by what it accepted,
    and in prompt lookup's plain steps a finished row ahead of the others moves on with them. Their
    slots are never read again, but every round writes them."""
    session.pos = (session.pos + by).clamp(max=session.valid.shape[1] - 1 - session.k)


def _emit(session: SpeculativeSession, candidates: list[list[int]], counts: list[int], accepted=None) -> list[list[int]]:
    """Each row's new tokens out of its candidates: cut after an end token or at max_new_tokens.
    Updates finished, emitted, the acceptance stats (rows with counts[row] tokens proposed, of which
    accepted[row] were taken) and prompt lookup's text. Python lists, converted once: per-row tensor
    indexing would cost more than a small model's whole step."""
    eos = session.eos_ids
    finished, emitted = session.finished.tolist(), session.emitted.tolist()
    gained, accepted_real = [], 0
    for row, done in enumerate(finished):
        if done:
            gained.append([])
            continue
        if counts[row]:  # a round in the stats is a row that had tokens proposed
            n = min(accepted[row], counts[row])
            session.accepted[n] += 1
            session.proposed += counts[row]
            accepted_real += n
        room = session.max_new_tokens - emitted[row]
        tokens = candidates[row][:room]
        for i, token in enumerate(tokens):
            if token in eos:
                tokens = tokens[: i + 1]
                break
        finished[row] = (bool(tokens) and tokens[-1] in eos) or len(tokens) == room
        emitted[row] += len(tokens)
        gained.append(tokens)
        if session.lookup is not None:
            session.lookup.append(row, tokens)
    session.finished = torch.tensor(finished, device=session.finished.device)
    session.emitted = torch.tensor(emitted, device=session.emitted.device)
    if session.lookup is not None and any(counts):
        session.lookup.outcome(accepted_real, sum(1 for c in counts if c))
    return gained


def greedy_verify(compute: Callable, fed, valid, slots):
    """The target's pass over [last, d1..dj] and its greedy acceptance, as one function: compiled, the
    round's verification is one call (the acceptance is a handful of tiny ops)."""
    choice = compute(fed, valid, position_ids=None, cache_position=slots, last_only=False).argmax(dim=-1)
    j = fed.shape[1] - 1
    accepted = (fed[:, 1:] == choice[:, :j]).long().cumprod(dim=1).sum(dim=1)
    return accepted, choice.gather(1, accepted[:, None]).squeeze(1)


def verify_round(model, fed, valid, slots):
    """greedy_verify on the model's compute, as a function of the model (see draft_round)."""
    return greedy_verify(model.compute, fed, valid, slots)


def forward_all(model, input_ids, valid, slots):
    """The target's verification forward when sampling: every position's logits (the draft's is
    decoding.forward_step, the last position's)."""
    return model.compute(input_ids, valid, None, slots, False)


def _bound(fields: dict, fn: Callable, model) -> Callable:
    """fn(model, ...) compiled through the compile cache on its first call, as a function of the rest."""
    return functools.partial(cached_step(fields, fn), model)


def speculate_round(session: SpeculativeSession) -> list[list[int]]:
    """One round: the tokens each row gains (possibly none for finished rows)."""
    lookup = session.lookup
    if lookup is None:
        drafted, q = _draft_tokens(session)
        counts = [session.k] * drafted.shape[0]
    else:
        if lookup.skip:  # backing off: its plain steps in one go
            steps, lookup.skip = lookup.skip, 0
            return _plain_steps(session, steps)
        proposal = lookup.propose(session.finished.tolist())
        if proposal is None:
            return _plain_steps(session, 1)
        # Padding (rows that found less) is verified too, harmlessly, but not counted as proposed;
        # a proposal is certain (q one-hot when sampling: _accept with q None).
        (drafted, counts), q = proposal, None
    fed = torch.cat([session.last[:, None], drafted], dim=1)
    slots = _slots(session, torch.arange(fed.shape[1], device=fed.device))
    # a draft round's shapes never change; a lookup verification's width varies: its guards may be
    # skipped once that width was run
    trusted = session.rounds > 0 if lookup is None else fed.shape[1] in lookup.calls_run
    if session.verify is not None:  # greedy
        accepted, following = guarded_call(trusted, session.verify, fed, session.valid, slots)
    else:
        target_logits = guarded_call(trusted, session.target, fed, session.valid, position_ids=None, cache_position=slots, last_only=False)
        accepted, following = _accept(session, drafted, q, target_logits)  # q None: a lookup proposal
    if lookup is not None:
        lookup.calls_run.add(fed.shape[1])
    # Finished rows keep their pointer (they rewrite the same slots).
    _advance(session, torch.where(session.finished, 0, accepted + 1))

    n_accepted, drafted_list = accepted.tolist(), drafted.tolist()
    candidates = [d[:n] + [f] for d, n, f in zip(drafted_list, n_accepted, following.tolist())]
    gained = _emit(session, candidates, counts, n_accepted)
    session.last = following
    return gained


# -- what the front end calls on every rank ---------------------------------------------------


def start(
    target_key: StateKey,
    draft_key: StateKey | None,
    input_ids,
    attention_mask,
    params,
    seed,
    eos,
    k: int,
    max_new_tokens: int,
    compile_fields: dict | None = None,
    max_ngram: int = 2,
):
    """Prefill the target (and the draft); the first token comes from the target. Returns it per row.
    draft_key None: prompt lookup proposes up to k tokens, matching n-grams of up to max_ngram.
    compile_fields: None decodes eagerly; else the compile cache fields of each compiled function of
    the rounds (compile_policy.speculative_fields: "draft", "verify", "target", "plain"), each
    compiled ahead of time on its first call through this machine's compile cache."""
    target = worker_state()[target_key]
    draft = worker_state()[draft_key] if draft_key is not None else None
    device = device_of(target)
    generator = seeded_generator(params, seed, device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, prompt_len = input_ids.shape
    eos = torch.tensor(eos, dtype=torch.long, device=device)  # as plain decoding makes it (its compiled step takes it)
    compile = compile_fields is not None
    greedy = not params.do_sample
    # Every tensor of the session is an inference tensor, as those the rounds make: a compiled step's
    # guards tell the two kinds apart, so mixing them would recompile it in the middle of a session.
    with torch.inference_mode():
        valid = validity_mask(attention_mask, target.max_seq_len)
        first = next_tokens(prefill(target, input_ids, attention_mask), params, generator)
        if draft is not None:
            prefill(draft, input_ids, attention_mask)
        lookup = PromptLookup.start(input_ids, attention_mask, first, k, max_ngram, pad_to_k=compile) if draft is None else None
        session = SpeculativeSession(
            valid=valid,
            pos=torch.full((batch,), prompt_len, device=device),
            last=first,
            finished=torch.isin(first, eos) | (max_new_tokens <= 1),
            emitted=torch.ones(batch, dtype=torch.long, device=device),
            params=params,
            generator=generator,
            eos=eos,
            k=k,
            max_new_tokens=max_new_tokens,
            accepted=[0] * (k + 1),
            draft=None if draft is None else draft.compute,
            target=target.compute,
            lookup=lookup,
        )
        if compile:  # each function compiled ahead of time, through the compile cache, on its first call
            if greedy:
                session.verify = _bound(compile_fields["verify"], verify_round, target)
                if draft is not None:
                    session.greedy_draft = _bound(compile_fields["draft"], draft_round, draft)
            else:
                session.target = as_compute(_bound(compile_fields["target"], forward_all, target))
                if draft is not None:
                    session.draft = as_compute(_bound(compile_fields["draft"], forward_step, draft))
        elif greedy:
            session.verify = functools.partial(greedy_verify, target.compute)
            if draft is not None:
                session.greedy_draft = functools.partial(greedy_draft, draft.compute)
        if lookup is not None:
            ahead = CachedSteps(compile_fields["plain"]) if compile else None
            session.plain_step = decode_step(target, target_key, compile, eos, 0, params, generator, ahead=ahead)
    worker_state()[owned_key(target_key, SESSION)] = session
    return first.cpu()


def resume(target_key: StateKey, rounds: int):
    """Up to `rounds` rounds; returns (tokens gained per row, every row finished, acceptance histogram,
    tokens proposed so far)."""
    session = worker_state()[owned_key(target_key, SESSION)]
    gained = [[] for _ in range(session.last.shape[0])]
    with torch.inference_mode():
        for _ in range(rounds):
            if bool(session.finished.all()):
                break
            round_tokens = speculate_round(session)  # trusting the compiled guards per call
            session.rounds += 1
            for row, tokens in enumerate(round_tokens):
                gained[row] += tokens
    return gained, bool(session.finished.all()), list(session.accepted), session.proposed


def end(target_key: StateKey) -> None:
    end_session(target_key, SESSION)
