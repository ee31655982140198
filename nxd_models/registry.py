"""The zoo: names users type -> model family and Hugging Face repo id (families.py: model_type -> family)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Trained by scripts/train_demo_models.py and shipped in the package (see demo_models/README.md).
DEMO_MODELS = Path(__file__).parent / "demo_models"


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    repo_id: str  # on the Hugging Face hub; empty for a bundled model
    description: str
    bundled: Path | None = None  # a directory inside the package: no download


_MODELS = [
    ZooModel("demo-llama", "llama", "", "bundled 5M-parameter Llama trained on Python's stdlib (tp 1/2/4)", DEMO_MODELS / "demo-llama"),
    ZooModel(
        "demo-llama-draft", "llama", "", "bundled 1.5M-parameter draft for demo-llama (same tokenizer)", DEMO_MODELS / "demo-llama-draft"
    ),
    ZooModel("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf", "Llama-2 7B base"),
    ZooModel("llama-2-7b-chat", "llama", "meta-llama/Llama-2-7b-chat-hf", "Llama-2 7B chat"),
    ZooModel("llama-2-13b", "llama", "meta-llama/Llama-2-13b-hf", "Llama-2 13B base"),
    ZooModel("llama-2-13b-chat", "llama", "meta-llama/Llama-2-13b-chat-hf", "Llama-2 13B chat"),
    ZooModel("llama-2-70b", "llama", "meta-llama/Llama-2-70b-hf", "Llama-2 70B base (GQA, 8 KV heads)"),
    ZooModel("llama-2-70b-chat", "llama", "meta-llama/Llama-2-70b-chat-hf", "Llama-2 70B chat"),
    ZooModel("tinyllama-1.1b", "llama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B chat (GQA, 4 KV heads)"),
    ZooModel("llama-3-8b", "llama", "meta-llama/Meta-Llama-3-8B", "Llama-3 8B base (GQA, rope_theta 500000)"),
    ZooModel("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B", "Llama-3.2 1B (llama3 rope scaling, tied embeddings)"),
    ZooModel(
        "bert-base-cased-finetuned-mrpc",
        "bert",
        "google-bert/bert-base-cased-finetuned-mrpc",
        "BERT base cased, paraphrase classifier (MRPC)",
    ),
    ZooModel("bert-base-uncased", "bert", "google-bert/bert-base-uncased", "BERT base uncased, masked LM"),
    ZooModel("bert-base-cased", "bert", "google-bert/bert-base-cased", "BERT base cased, masked LM"),
    ZooModel("bert-large-uncased", "bert", "google-bert/bert-large-uncased", "BERT large uncased, masked LM"),
    ZooModel("bert-large-cased", "bert", "google-bert/bert-large-cased", "BERT large cased, masked LM"),
    ZooModel("t5-small", "t5", "google-t5/t5-small", "T5 v1.0 small (60M)"),
    ZooModel("t5-base", "t5", "google-t5/t5-base", "T5 v1.0 base (220M)"),
    ZooModel("t5-large", "t5", "google-t5/t5-large", "T5 v1.0 large (770M)"),
    ZooModel("t5-3b", "t5", "google-t5/t5-3b", "T5 v1.0 3B"),
    ZooModel("flan-t5-small", "t5", "google/flan-t5-small", "Flan-T5 small (v1.1 gated-GELU, 77M)"),
    ZooModel("flan-t5-base", "t5", "google/flan-t5-base", "Flan-T5 base (248M)"),
    ZooModel("flan-t5-large", "t5", "google/flan-t5-large", "Flan-T5 large (783M)"),
    ZooModel("flan-t5-xl", "t5", "google/flan-t5-xl", "Flan-T5 XL (3B)"),
]
MODELS: dict[str, ZooModel] = {m.name: m for m in _MODELS}


def list_models() -> list[str]:
    return sorted(MODELS)
