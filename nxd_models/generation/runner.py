"""NxD's runner entry point, kept under NxD's module name: generate_on_neuron (front end).

The decoding loop itself runs in the workers: worker/decoding.py.
"""

from __future__ import annotations


def generate_on_neuron(prompt, target_model, draft_model=None, **kwargs):
    """NxD's runner entry point, kept as a thin alias of target_model.generate."""
    if draft_model is not None:
        kwargs["draft_model"] = draft_model
    return target_model.generate(prompt, **kwargs)
