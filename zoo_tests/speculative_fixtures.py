"""The speculative sampler on its own: many rows of one round, and a chi-square against the target."""

import torch

from nxd_models.generation.worker.sampling import SamplingParams
from nxd_models.generation.worker.speculative import SpeculativeSession, _accept


def sampling_session(k: int, generator: torch.Generator) -> SpeculativeSession:
    """A session with only what the sampler (_accept) reads."""
    return SpeculativeSession(
        valid=None,
        pos=None,
        last=None,
        finished=None,
        emitted=None,
        params=SamplingParams(do_sample=True),
        generator=generator,
        eos=torch.tensor([]),
        k=k,
        max_new_tokens=8,
    )


def first_tokens_of_a_round(drafted: torch.Tensor, q: torch.Tensor | None, p0: torch.Tensor, generator) -> tuple:
    """(each row's first new token, accepted per row) of one sampled round over the rows of drafted
    [rows, k] with draft distributions q (None: proposals that are certainties, as prompt lookup's),
    where the target's distribution is p0 at every position."""
    rows, k = drafted.shape
    target_logits = p0.log()[None, None].expand(rows, k + 1, p0.numel())
    session = sampling_session(k, generator)
    accepted, following = _accept(session, drafted, q, target_logits)
    return torch.where(accepted > 0, drafted[:, 0], following), accepted


def chi_square(tokens: torch.Tensor, p0: torch.Tensor) -> float:
    """Pearson's statistic of the tokens' counts against p0."""
    observed = torch.bincount(tokens, minlength=p0.numel()).double()
    expected = p0.double() * tokens.numel()
    return float(((observed - expected) ** 2 / expected).sum())
