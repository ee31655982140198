"""Speculative decoding with a draft model, inside the workers (Leviathan et al. 2023).

Each round the draft proposes k tokens, one at a time; the target scores all
of them in one pass; each row keeps the longest accepted prefix plus one
token from the target (a correction, or a bonus when all k were accepted).

- Greedy: a draft token is accepted when it is the target's argmax, so the
  output is exactly the target's greedy output.
- Sampling: accepted with probability min(1, p/q); on rejection the token is
  drawn from norm(max(p - q, 0)). The output is distributed as the target's.

Rows of a batch accept different numbers of tokens, so every row has its own
KV-cache slot pointer (`pos`). Both models always hold the same tokens at the
same slots ([last, d1..dk] are written by both each round); rolling a row back
is moving its pointer: the slots past it are never attended (causal over
slots) and are overwritten next round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nxd_core.worker_process import StateKey, worker_state

from ...worker_ops import device_of, end_session, owned_key
from .decoding import compiled, prefill, trusted_guards, validity_mask
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
    rounds: int = 0
    accepted: list[int] = field(default_factory=list)  # histogram: rounds (per row) that accepted i draft tokens


def _draft_tokens(session: SpeculativeSession):
    """k draft tokens [batch, k] and their distributions [batch, k, vocab] (None when greedy).

    The draft also consumes its k-th token, so that its cache holds the same slots as the target's.
    """
    token, tokens, dists = session.last, [], []
    for j in range(session.k + 1):
        slots = (session.pos + j)[:, None]
        logits = session.draft(token[:, None], session.valid, position_ids=None, cache_position=slots, last_only=True)[:, -1]
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
    """Per row: how many draft tokens are accepted [batch], and the target's next token [batch]."""
    batch, k = drafted.shape
    if not session.params.do_sample:
        choice = target_logits.argmax(dim=-1)  # [batch, k + 1]
        accepted = (drafted == choice[:, :k]).long().cumprod(dim=1).sum(dim=1)
        return accepted, choice.gather(1, accepted[:, None]).squeeze(1)
    p = probabilities(target_logits, session.params)  # [batch, k + 1, vocab]
    p_drafted = p[:, :k].gather(-1, drafted[..., None]).squeeze(-1)
    q_drafted = q.gather(-1, drafted[..., None]).squeeze(-1)
    u = torch.rand(batch, k, generator=session.generator, device=p.device)
    accepted = (u * q_drafted < p_drafted).long().cumprod(dim=1).sum(dim=1)  # u < p/q, without dividing by 0
    rows = torch.arange(batch, device=p.device)
    residual = p[rows, accepted.clamp(max=k - 1)] - q[rows, accepted.clamp(max=k - 1)]
    residual = residual.clamp(min=0)
    all_accepted = accepted == k
    # A residual that rounds to nothing (draft == target) falls back to the target's own distribution.
    empty = residual.sum(dim=-1) <= 0
    dist = torch.where((all_accepted | empty)[:, None], p[rows, accepted], residual)
    return accepted, torch.multinomial(dist, 1, generator=session.generator).squeeze(-1)


def speculate_round(session: SpeculativeSession) -> list[list[int]]:
    """One round: the tokens each row gains (possibly none for finished rows)."""
    drafted, q = _draft_tokens(session)
    fed = torch.cat([session.last[:, None], drafted], dim=1)
    slots = session.pos[:, None] + torch.arange(session.k + 1, device=fed.device)
    target_logits = session.target(fed, session.valid, position_ids=None, cache_position=slots, last_only=False)
    accepted, following = _accept(session, drafted, q, target_logits)
    # Finished rows keep their pointer (they rewrite the same slots), so they never outgrow the cache.
    session.pos += torch.where(session.finished, 0, accepted + 1)

    gained = []
    for row in range(fed.shape[0]):
        if session.finished[row]:
            gained.append([])
            continue
        n = int(accepted[row])
        session.accepted[n] += 1
        tokens = drafted[row, :n].tolist() + [int(following[row])]
        room = session.max_new_tokens - int(session.emitted[row])
        tokens = tokens[:room]
        for i, token in enumerate(tokens):
            if token in session.eos.tolist():
                tokens = tokens[: i + 1]
                break
        if (tokens and tokens[-1] in session.eos.tolist()) or len(tokens) == room:
            session.finished[row] = True
        session.emitted[row] += len(tokens)
        gained.append(tokens)
    session.last = following
    return gained


# -- what the front end calls on every rank ---------------------------------------------------


def start(
    target_key: StateKey,
    draft_key: StateKey,
    input_ids,
    attention_mask,
    params,
    seed,
    eos,
    k: int,
    max_new_tokens: int,
    compile: bool = False,
):
    """Prefill both models; the first token comes from the target. Returns it per row."""
    target, draft = worker_state()[target_key], worker_state()[draft_key]
    device = device_of(target)
    generator = seeded_generator(params, seed, device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, prompt_len = input_ids.shape
    valid = validity_mask(attention_mask, target.max_seq_len)
    with torch.inference_mode():
        first = next_tokens(prefill(target, input_ids, attention_mask), params, generator)
        prefill(draft, input_ids, attention_mask)
    eos = torch.tensor(eos, dtype=torch.long, device=device)
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
        draft=compiled(draft_key, "compute", draft.compute) if compile else draft.compute,
        target=compiled(target_key, "compute", target.compute) if compile else target.compute,
    )
    worker_state()[owned_key(target_key, SESSION)] = session
    return first.cpu()


def resume(target_key: StateKey, rounds: int):
    """Up to `rounds` rounds; returns (tokens gained per row, every row finished, acceptance histogram)."""
    session = worker_state()[owned_key(target_key, SESSION)]
    gained = [[] for _ in range(session.last.shape[0])]
    with torch.inference_mode():
        for _ in range(rounds):
            if bool(session.finished.all()):
                break
            with trusted_guards(session.rounds > 0):  # every round calls both models with the same shapes
                round_tokens = speculate_round(session)
            session.rounds += 1
            for row, tokens in enumerate(round_tokens):
                gained[row] += tokens
    return gained, bool(session.finished.all()), list(session.accepted)


def end(target_key: StateKey) -> None:
    end_session(target_key, SESSION)
