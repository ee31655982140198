"""Continuous batching inside the workers: KV-cache rows that requests come into and leave.

The front end's scheduler (nxd_models/serving/engine.py) plans each step; every rank runs the
same `step` with the same plan, and only token ids cross back:

  1. retire: rows whose request ended (finished, or its client went away) stop decoding;
  2. prefill: chunks of admitted prompts, each written into its own row at batch 1 (first_row);
     a prompt's last chunk chooses its first token, and the row joins the decoding rows;
  3. decode: one token for every decoding row, all max_batch_size rows in one forward.

Batch invariance: a request's tokens depend only on its prompt, its sampling parameters and its
seed, never on the other requests. Prompts are cut at fixed slots (multiples of the chunk size,
whatever the load) and prefilled alone; decoding always runs every row, so its shapes never
change (rows without a request feed a pad token into their own row at their next slot, which
nothing attends to and the row's next prefill overwrites). A matrix product of one shape computes
each output row with the same kernel and the same blocking, whatever the other rows hold.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from nxd_core.worker_process import StateKey, worker_state

from ...worker_ops import device_of, end_session, owned_key
from .compiling import switch_to_compiled
from .decoding import guarded_call
from .sampling import SamplingParams, next_tokens, seeded_generator

BATCH = "serving"  # the worker_state() kind of a model's continuous batch
FEED_WHEN_IDLE = 0  # the token a row without a request feeds while the others decode


@dataclass(frozen=True)
class Prefill:
    """A piece of one request's prompt, written into its row from slot `start`."""

    row: int
    token_ids: list[int]
    start: int  # 0 starts the request: its row takes params and a generator seeded with seed
    last: bool  # the prompt's last piece: choose the request's first token
    params: SamplingParams | None = None
    seed: int | None = None


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator | None
    slot: int = 0  # the next KV-cache slot this row writes
    last: int = FEED_WHEN_IDLE  # the token it feeds at the next decode step


@dataclass
class Batch:
    rows: dict[int, Row]  # rows holding a request (prefilling or decoding)
    decoding: set[int]
    compute: object  # (tokens, slots) -> logits: decode_rows, or its compiled version
    steps: int = 0


def open_batch(key: StateKey, compile_fields: dict | None = None) -> tuple[int, dict | None]:
    """Start serving on the model at key: every row free. Returns the number of rows, and with
    compile_fields (the compile cache key's fields of the serving step) the compile report of
    switch_to_compiled: the decode step is compiled (or loaded from this machine's compile cache)
    here, before the first request, by one decode of idle rows."""
    model = worker_state()[key]
    batch = Batch(rows={}, decoding=set(), compute=functools.partial(decode_rows, model))
    report = None
    if compile_fields is not None:

        def to_compiled(ahead):
            batch.compute = functools.partial(ahead.step(decode_rows), model)

        with torch.inference_mode():
            # idle rows feed a pad token at slot 0 of their own row: every row's first prefill overwrites it
            _, report = switch_to_compiled(compile_fields, to_compiled, lambda: _decode(model, batch, device_of(model)))
    worker_state()[owned_key(key, BATCH)] = batch
    return model.max_batch_size, report


def decode_rows(model, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Logits [rows, 1, vocab] of one token per row, each at its own KV-cache slot [rows, 1] (a
    module-level function of the model: what the compile cache compiles ahead of time)."""
    return model.compute(tokens, None, None, slots, True)


def close_batch(key: StateKey) -> None:
    end_session(key, BATCH)


def step(key: StateKey, retire: list[int], prefills: list[Prefill], decode: bool) -> dict[int, list[int]]:
    """One scheduler step (see the module's docstring); the tokens each row made, in order."""
    model = worker_state()[key]
    batch: Batch = worker_state()[owned_key(key, BATCH)]
    device = device_of(model)
    for row in retire:
        batch.rows.pop(row, None)
        batch.decoding.discard(row)
    made: dict[int, list[int]] = {}
    with torch.inference_mode():
        for piece in prefills:
            token = _prefill(model, batch, piece, device)
            if token is not None:
                made[piece.row] = [token]
        if decode and batch.decoding:
            for row, token in _decode(model, batch, device).items():
                made.setdefault(row, []).append(token)
    return made


def _prefill(model, batch: Batch, piece: Prefill, device) -> int | None:
    if piece.start == 0:
        batch.decoding.discard(piece.row)
        batch.rows[piece.row] = Row(piece.params, seeded_generator(piece.params, piece.seed, device))
    row = batch.rows[piece.row]
    if piece.start != row.slot:
        raise RuntimeError(f"row {piece.row}: a prompt piece from slot {piece.start}, but the row is at slot {row.slot}")
    ids = torch.tensor([piece.token_ids], dtype=torch.long, device=device)
    slots = torch.arange(piece.start, piece.start + ids.shape[1], device=device)
    logits = model(ids, cache_position=slots, last_only=True, first_row=piece.row)[:, -1]
    row.slot += ids.shape[1]
    if not piece.last:
        return None
    row.last = int(_choose(logits, [row])[0])
    batch.decoding.add(piece.row)
    return row.last


def _decode(model, batch: Batch, device) -> dict[int, int]:
    rows = model.max_batch_size
    tokens = torch.full((rows, 1), FEED_WHEN_IDLE, dtype=torch.long)
    slots = torch.zeros(rows, 1, dtype=torch.long)
    for index, row in batch.rows.items():
        tokens[index, 0] = row.last if index in batch.decoding else FEED_WHEN_IDLE
        slots[index, 0] = min(row.slot, model.max_seq_len - 1)
    logits = guarded_call(batch.steps > 0, batch.compute, tokens.to(device), slots.to(device))[:, -1]
    batch.steps += 1
    decoding = sorted(batch.decoding)
    chosen = _choose(logits[decoding], [batch.rows[i] for i in decoding])
    made = {}
    for index, token in zip(decoding, chosen.tolist()):
        row = batch.rows[index]
        row.slot += 1
        row.last = token
        made[index] = token
    return made


def _choose(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Each row's next token from its logits [rows, vocab], with its own parameters and generator."""
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row.params.do_sample:
            tokens[i] = next_tokens(logits[i : i + 1], row.params, row.generator)[0]
    return tokens
