"""The zoo: names users type -> model family and Hugging Face repo id."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    repo_id: str
    description: str


_MODELS = [
    ZooModel("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf", "Llama-2 7B base"),
    ZooModel("llama-2-7b-chat", "llama", "meta-llama/Llama-2-7b-chat-hf", "Llama-2 7B chat"),
    ZooModel("llama-2-13b", "llama", "meta-llama/Llama-2-13b-hf", "Llama-2 13B base"),
    ZooModel("llama-2-13b-chat", "llama", "meta-llama/Llama-2-13b-chat-hf", "Llama-2 13B chat"),
    ZooModel("llama-2-70b", "llama", "meta-llama/Llama-2-70b-hf", "Llama-2 70B base (GQA, 8 KV heads)"),
    ZooModel("llama-2-70b-chat", "llama", "meta-llama/Llama-2-70b-chat-hf", "Llama-2 70B chat"),
    ZooModel("tinyllama-1.1b", "llama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B chat (GQA, 4 KV heads)"),
    ZooModel("llama-3-8b", "llama", "meta-llama/Meta-Llama-3-8B", "Llama-3 8B base (GQA, rope_theta 500000)"),
    ZooModel("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B", "Llama-3.2 1B (llama3 rope scaling, tied embeddings)"),
]
MODELS: dict[str, ZooModel] = {m.name: m for m in _MODELS}

# config.json's model_type -> the module that holds the family's parallel architecture.
FAMILY_MODULES = {"llama": "nxd_models.llama"}


def list_models() -> list[str]:
    return sorted(MODELS)


def family_module(model_type: str, where: str = "the checkpoint"):
    """The family module for a config's model_type, or a clear error for other architectures."""
    for family, module in FAMILY_MODULES.items():
        mod = importlib.import_module(module)
        if model_type in mod.MODEL_TYPES:
            return mod
    raise ValueError(
        f"{where} is a '{model_type}' model; from_pretrained_parallel supports the families "
        f"{sorted(FAMILY_MODULES)} (zoo names: {', '.join(list_models())})"
    )
