"""Beam search for encoder-decoders, in the workers, step for step as Hugging Face's `_beam_search`.

Per source, `num_beams` running hypotheses and `num_beams` finished ones. Each
step scores every (beam, token) continuation by its summed log-probability,
keeps the top 2 x num_beams (so enough stay alive after some end), moves
those that ended (end-of-sequence or the length limit) among the top
num_beams into the finished set with the length penalty
score / length ** length_penalty, and continues with the best unfinished
ones, reordering the decoder's KV cache to follow them. The search stops
when no running beam can beat the worst finished one (HF's heuristic for
early_stopping False / "never"), when every source has num_beams finished
(early_stopping True), or at max_new_tokens.
"""

from __future__ import annotations

import torch

from nxd_core.worker_process import StateKey, worker_state

from ...worker_ops import device_of
from .seq2seq import decode_one_token, start_decoding

# HF's stand-in for "impossible": added to scores that must never be picked.
_NEVER = -1.0e9


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [batch, beams, ...] -> the beams in index [batch, k]."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _improvement_possible(
    unsatisfied, running_scores, finished_scores, is_finished, length, max_new_tokens, early_stopping, length_penalty
):
    """Can the best running beam still beat the worst finished one? (HF's _check_early_stop_heuristic)"""
    best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else length
    best_possible = running_scores[:, :1] / (best_length**length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
    return unsatisfied & (best_possible > worst_finished).any(dim=-1, keepdim=True)


def search(
    model,
    input_ids,
    attention_mask,
    num_beams: int,
    max_new_tokens: int,
    eos: list[int],
    start_id: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
):
    """(sequences [batch, num_beams, max_new_tokens], scores [batch, num_beams], lengths [batch, num_beams]),
    finished hypotheses best first."""
    batch, device = input_ids.shape[0], input_ids.device
    start_decoding(model, input_ids, attention_mask, rows_per_source=num_beams)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * num_beams
    top_num_beams = torch.arange(keep, device=device) < num_beams
    # Sequences hold the start token at 0; what HF fills unused places with does not matter: lengths say where rows end.
    running = torch.full((batch, num_beams, max_new_tokens + 1), start_id, dtype=torch.long, device=device)
    finished = running.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _NEVER  # all beams start equal: only the first may expand at step one
    finished_scores = torch.full((batch, num_beams), _NEVER, device=device)
    running_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    finished_lengths = running_lengths.clone()
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    unsatisfied = torch.ones(batch, 1, dtype=torch.bool, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * num_beams
    length = 1  # tokens in each running sequence, the start token included
    while True:
        logits = decode_one_token(model, running[:, :, length - 1].reshape(-1), length - 1)
        vocab = logits.shape[-1]
        log_probs = logits.log_softmax(dim=-1).view(batch, num_beams, vocab) + running_scores[:, :, None]
        top_scores, top_indices = torch.topk(log_probs.view(batch, -1), k=keep)
        from_beam = top_indices // vocab
        candidates = _gather(running, from_beam)
        candidates[:, :, length] = top_indices % vocab
        candidate_lengths = _gather(running_lengths, from_beam) + 1
        ends = (length + 1 >= max_new_tokens + 1) | torch.isin(top_indices % vocab, eos_ids)

        # The best candidates that did not end carry on.
        alive_scores = top_scores + ends.float() * _NEVER
        carry_on = torch.topk(alive_scores, k=num_beams)[1]
        running, running_scores = _gather(candidates, carry_on), _gather(alive_scores, carry_on)
        running_lengths = _gather(candidate_lengths, carry_on)
        model.reorder_cache((_gather(from_beam, carry_on) + offsets).reshape(-1))

        # Those that ended among the top num_beams compete for the finished places.
        just_finished = ends & top_num_beams[None, :]
        ended_scores = top_scores / (length**length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        ended_scores = ended_scores + full.float() * _NEVER + (~unsatisfied).float() * _NEVER + (~just_finished).float() * _NEVER
        merged_scores = torch.cat((finished_scores, ended_scores), dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        finished = _gather(torch.cat((finished, candidates), dim=1), best)
        finished_scores = _gather(merged_scores, best)
        finished_lengths = _gather(torch.cat((finished_lengths, candidate_lengths), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

        length += 1
        unsatisfied = _improvement_possible(
            unsatisfied, running_scores, finished_scores, is_finished, length - 1, max_new_tokens, early_stopping, length_penalty
        )
        all_full = bool(is_finished.all()) and early_stopping is True
        if not bool(unsatisfied.any()) or all_full or bool(ends.all()):
            break
    return finished[:, :, 1:], finished_scores, finished_lengths


def beam_search(
    key: StateKey,
    input_ids,
    attention_mask,
    num_beams: int,
    max_new_tokens: int,
    eos: list[int],
    decoder_start_token_id: int,
    length_penalty: float,
    early_stopping,
    num_return_sequences: int,
):
    """What the front end calls on every rank: the best num_return_sequences hypotheses per source, as token
    lists (source-major), and their scores."""
    model = worker_state()[key]
    device = device_of(model)
    with torch.inference_mode():
        sequences, scores, lengths = search(
            model,
            input_ids.to(device),
            attention_mask.to(device),
            num_beams,
            max_new_tokens,
            eos,
            decoder_start_token_id,
            length_penalty,
            early_stopping,
        )
    sequences, scores, lengths = (t[:, :num_return_sequences].flatten(0, 1).cpu() for t in (sequences, scores, lengths))
    rows = [seq[:n].tolist() for seq, n in zip(sequences, lengths.tolist())]
    return rows, scores.tolist()
