"""Random weights in a Llama (or mixture-of-experts) layout, written as a Hugging Face safetensors
directory, streamed.

Names and shapes are the checkpoint's, from the family's parallel model built at tp=1 on the meta
device (for a MoE layout: one tensor per expert, as hub checkpoints store them; tied names are
not stored); tensors are drawn and written one at a time, so a 13.5 GB checkpoint never sits in
memory. A layout's "model_type" picks the family (default llama).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from nxd_core.safetensors_stream import SafetensorsWriter, nbytes
from nxd_models.convert import family_specs

LAYOUTS = {
    # Llama-2-7B: hidden 4096, 32 layers, 32 heads, vocab 32000 (~13.5 GB in bf16)
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # TinyLlama-1.1B (GQA, 4 KV heads)
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    # ~20M parameters: per-step overhead dominates decoding
    "20m": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=1024,
    ),
    # a smaller draft with the same vocabulary
    "draft": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=1024,
    ),
    "small": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=256,
    ),
    # OLMoE-1B-7B's shape as a Qwen3-MoE checkpoint: 64 experts of width 1024, top 8, 16 layers
    # (6.9B parameters, ~12.9 GiB bf16; 1.3B active per token). tp=8: ~1.6 GiB per rank.
    "moe-7b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=8192,
        moe_intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
        vocab_size=50304,
        max_position_embeddings=4096,
    ),
    # A MoE that decodes at a measurable speed here: 32 experts of width 512, top 4, 12 layers
    # (0.76B parameters, 1.5 GB bf16; 0.23B read per decoded token).
    "moe-1b": dict(
        model_type="qwen3_moe",
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=512,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=50304,
        max_position_embeddings=4096,
    ),
    "moe-tiny": dict(
        model_type="qwen3_moe",
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1000,
        max_position_embeddings=256,
    ),
}


def layout_config(layout: str, dtype=torch.bfloat16):
    fields = dict(LAYOUTS[layout])
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields, dtype=str(dtype).removeprefix("torch."))


def write_random_llama(directory, layout: str, dtype=torch.bfloat16, max_file_bytes: int = 5 << 30, seed: int = 0) -> int:
    """Write config.json and HF-style shards (with an index); return the bytes of weights written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = layout_config(layout, dtype)
    # The HF class, as a hub checkpoint names it: llama.cpp's converter picks its model by it.
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(directory)
    specs, _ = family_specs(config)
    shapes = {name: tuple(t.shape) for name, t in _meta_state(config).items() if name in specs}
    files, current, size = [], [], 0
    for name, shape in shapes.items():
        tensor_bytes = nbytes(dtype, shape)
        if current and size + tensor_bytes > max_file_bytes:
            files.append(current)
            current, size = [], 0
        current.append(name)
        size += tensor_bytes
    files.append(current)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, names in enumerate(files):
        file = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        writer = SafetensorsWriter(directory / file, [(n, dtype, shapes[n]) for n in names], {"format": "pt"})
        for name in names:
            writer.write(name, (torch.randn(shapes[name], generator=generator) * 0.02).to(dtype))
            weight_map[name] = file
            total += nbytes(dtype, shapes[name])
        writer.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def decode_bytes_per_token(layout: str, weight_bytes: int, dtype=torch.bfloat16, whole_embedding: bool = True) -> int:
    """Weight bytes one decoded token reads: all of them, except (in a MoE) the experts its router
    did not choose. A token reads one row of the embedding table: whole_embedding=False counts
    that row only (an untied table; a tied one is read whole by the LM head)."""
    config = layout_config(layout, dtype)
    if not whole_embedding and not config.tie_word_embeddings:
        weight_bytes -= nbytes(dtype, (config.vocab_size - 1, config.hidden_size))
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not experts:
        return weight_bytes
    from nxd_models.moe import is_sparse_layer

    if config.model_type == "mixtral":
        sparse, width = config.num_hidden_layers, config.intermediate_size
    else:
        sparse = sum(is_sparse_layer(config, i) for i in range(config.num_hidden_layers))
        width = config.moe_intermediate_size
    unread = sparse * (experts - config.num_experts_per_tok) * nbytes(dtype, (3, config.hidden_size, width))
    return weight_bytes - unread


def _meta_state(config) -> dict:
    """The full (tp=1) shapes: family_specs names what a checkpoint stores, this model their shapes."""
    from nxd_models.families import lookup

    return lookup(config.model_type).build(config, dtype=torch.float32, device="meta").state_dict()


def evict_from_page_cache(directory) -> None:
    """Ask the kernel to drop these files' cached pages, so the next read comes from the disk."""
    for path in Path(directory).rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
