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
    ZooModel("qwen2.5-0.5b", "qwen2", "Qwen/Qwen2.5-0.5B", "Qwen2.5 0.5B base (q/k/v biases, 2 KV heads, tied embeddings)"),
    ZooModel("qwen2.5-0.5b-instruct", "qwen2", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B instruct"),
    ZooModel("qwen2.5-1.5b", "qwen2", "Qwen/Qwen2.5-1.5B", "Qwen2.5 1.5B base (tied embeddings)"),
    ZooModel("qwen2.5-7b", "qwen2", "Qwen/Qwen2.5-7B", "Qwen2.5 7B base (28 heads, 4 KV heads)"),
    ZooModel("qwen2.5-7b-instruct", "qwen2", "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5 7B instruct"),
    ZooModel("qwen3-0.6b", "qwen3", "Qwen/Qwen3-0.6B", "Qwen3 0.6B (q/k norms, head_dim 128, tied embeddings)"),
    ZooModel("qwen3-4b", "qwen3", "Qwen/Qwen3-4B", "Qwen3 4B"),
    ZooModel("qwen3-8b", "qwen3", "Qwen/Qwen3-8B", "Qwen3 8B (32 heads, 8 KV heads)"),
    ZooModel("mistral-7b-v0.1", "mistral", "mistralai/Mistral-7B-v0.1", "Mistral 7B v0.1 (sliding window 4096)"),
    ZooModel("mistral-7b-instruct-v0.3", "mistral", "mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B instruct v0.3 (full attention)"),
    ZooModel("mixtral-8x7b", "mixtral", "mistralai/Mixtral-8x7B-v0.1", "Mixtral 8x7B (8 experts, top-2)"),
    ZooModel("mixtral-8x7b-instruct", "mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral 8x7B instruct"),
    ZooModel("qwen3-30b-a3b", "qwen3_moe", "Qwen/Qwen3-30B-A3B", "Qwen3-MoE 30B, 3B active (128 experts, top-8)"),
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
