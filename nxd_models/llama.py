"""Parallel Llama: Llama-2 (7B/13B/70B), Llama-3-style GQA, TinyLlama, MQA.

Module paths and parameter names are Hugging Face's `LlamaForCausalLM`, so
an HF checkpoint loads by name. The plan:

    q_proj, k_proj, v_proj   ColumnParallelLinear (heads split; KV heads replicated when tp > KV heads)
    o_proj                   RowParallelLinear
    gate_proj, up_proj       ColumnParallelLinear;  down_proj  RowParallelLinear
    embed_tokens             ParallelEmbedding over the vocabulary (padded when tp does not divide it)
    lm_head                  ColumnParallelLinear over the vocabulary, gathered: full-vocab logits
    norms, rotary embedding  replicated (Hugging Face's own modules)

The KV cache is a preallocated buffer per attention layer, written in place
at `cache_position` (slot indices shared by the batch). Left padding is
expressed by `attention_mask` over the slots, Hugging Face style.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from nxd_core import attention_kernel, cpu_kernels
from nxd_core import parallel_state as ps
from nxd_core.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, column_parallel_many

# The family contract (nxd_models.families.Family).
MODEL_TYPES = ("llama",)
HANDLE = "causal"
KV_CACHE = True
# Old HF checkpoints saved the rotary buffers; they are recomputed, never loaded.
IGNORED_CHECKPOINT_NAMES = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def default_max_seq_len(config) -> int:
    return config.max_position_embeddings


def adapt_checkpoint(tensors: dict, model: nn.Module) -> dict:
    """HF Llama checkpoints use this model's names: nothing to adapt."""
    return tensors


def valid_tp_values(config) -> list[int]:
    """tp must split the query heads; KV heads are split (tp divides them) or replicated (they divide tp)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return [tp for tp in ps.divisors(heads) if kv_heads % tp == 0 or tp % kv_heads == 0]


def check_tp(config, tp: int, family: str = "Llama") -> None:
    valid = valid_tp_values(config)
    if tp not in valid:
        raise ValueError(
            f"tp={tp} cannot shard this {family} config ({config.num_attention_heads} attention heads, "
            f"{config.num_key_value_heads} KV heads): valid tp values are {valid} (tp must divide the attention "
            "heads, and divide the KV heads or be a multiple of them; MLP widths and the vocabulary are padded)"
        )


def sliding_windows(config, by_layer_types: bool) -> tuple[int | None, ...]:
    """Each layer's sliding attention window (None: full attention), as Hugging Face reads the config:
    by_layer_types (Qwen2/3), `layer_types` names the sliding layers; otherwise (Mistral, Mixtral,
    Qwen3-MoE) every layer slides when `sliding_window` is set."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) if by_layer_types else None
    if window is None:
        return (None,) * config.num_hidden_layers
    if layer_types is None:
        return (window,) * config.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types[: config.num_hidden_layers])


def dense_mlp(config, layer_idx: int, dtype, device) -> tuple[str, nn.Module]:
    return "mlp", ParallelLlamaMLP(config, dtype, device)


@dataclass(frozen=True)
class DecoderArch:
    """What a Llama-like decoder family changes in the layers (the defaults are Llama's)."""

    qkv_bias: bool = False  # biases on q/k/v (sharded like their weights): Qwen2 always, Llama's attention_bias
    o_bias: bool = False  # a bias on o_proj (replicated, added after the all-reduce)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, after the projection and before RoPE
    windows: tuple[int | None, ...] = ()  # per layer: the sliding window (None or empty: full attention)
    # (config, layer_idx, dtype, device) -> (attribute name, the layer's MLP): dense or a mixture of experts
    mlp: Callable = field(default=dense_mlp)

    def window(self, layer_idx: int) -> int | None:
        return self.windows[layer_idx] if self.windows else None


def llama_arch(config) -> DecoderArch:
    bias = getattr(config, "attention_bias", False)
    return DecoderArch(qkv_bias=bias, o_bias=bias)


# Decoding and speculative verification attend with a few queries over the whole cache. There plain
# matmuls beat SDPA's flash kernel: inductor fuses them with the mask and softmax into one loop; on
# CPUs the kernel reads only the filled slots. 16, not 8: SDPA reads every slot of the cache, and a
# verification of 11 (HF's default prompt_lookup_num_tokens=10) cost twice one of 8 on the demo
# model (1.3 against 0.75 ms); with the kernel prompt lookup at k = 10 went from 0.82x to 1.10-1.55x
# of plain decoding on benchmarks/speculative.py's grounded task (a noisy hour; k = 7: 1.21-1.41x).
FEW_QUERIES = 16


def few_query_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention of q [b, heads, s, d] over k, v [b, kv_heads, slots, d] with a boolean mask
    [b, 1, s, slots]; softmax in float32 as Hugging Face's eager attention does. The query heads
    that share a KV head (GQA) are folded into the query dimension instead of repeating K and V.
    On CPUs the kernel does the same in one call, over the filled slots only (nxd_core.attention_kernel)."""
    if attention_kernel.qualifies(q, k, v):
        return attention_kernel.decode_attention(q, k, v, mask, scale)
    batch, heads, seq, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = (q.reshape(batch, kv_heads, group * seq, dim) @ k.transpose(-1, -2)).float() * scale
    scores = scores.view(batch, kv_heads, group, seq, slots).masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(batch, kv_heads, group * seq, slots)
    return (probs @ v).view(batch, heads, seq, dim)


class ParallelLlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype, device, arch: DecoderArch | None = None):
        super().__init__()
        arch = arch or llama_arch(config)
        tp = ps.get_tensor_model_parallel_size()
        check_tp(config, tp)
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.layer_idx, self.dtype = layer_idx, dtype  # the cache's dtype (the weights may be int8)
        self.head_dim = _head_dim(config)
        self.scaling = self.head_dim**-0.5
        self.sliding_window = arch.window(layer_idx)  # the model builds the matching mask
        bias = arch.qkv_bias
        common = dict(gather_output=False, dtype=dtype, device=device, unit=self.head_dim)
        self.q_proj = ColumnParallelLinear(hidden, heads * self.head_dim, bias=bias, **common)
        self.k_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=bias, max_parts=kv_heads, **common)
        self.v_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=bias, max_parts=kv_heads, **common)
        self.o_proj = RowParallelLinear(
            heads * self.head_dim, hidden, bias=arch.o_bias, input_is_parallel=True, dtype=dtype, device=device, unit=self.head_dim
        )
        # Within one head: replicated, the same weights for every head on every rank.
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps).to(dtype) if arch.qk_norm else None
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps).to(dtype) if arch.qk_norm else None
        self.local_kv_heads = self.k_proj.spec.shard_size // self.head_dim
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def allocate_kv_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        shape = (max_batch_size, self.local_kv_heads, max_seq_len, self.head_dim)
        device = self.k_proj.weight.device
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=device)

    def forward(self, x, cos, sin, mask, cache_position=None, first_row: int = 0):
        batch, seq, _ = x.shape
        q, k, v = (y.view(batch, seq, -1, self.head_dim) for y in column_parallel_many([self.q_proj, self.k_proj, self.v_proj], x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache_position is not None:
            rows = slice(first_row, first_row + batch)
            k_cache, v_cache = self.k_cache[rows], self.v_cache[rows]
            if cache_position.dim() == 1:  # the same slots for every row
                k_cache.index_copy_(2, cache_position, k)
                v_cache.index_copy_(2, cache_position, v)
            else:  # [batch, seq]: each row at its own slots (speculative decoding rolls rows back separately)
                # Indexed assignment writes only those slots; scatter_ with an expanded index copied
                # the whole cache on every call (7 of a 16 ms serving step at 32 rows).
                each_row = torch.arange(batch, device=cache_position.device)[:, None]
                k_cache[each_row, :, cache_position] = k.transpose(1, 2)
                v_cache[each_row, :, cache_position] = v.transpose(1, 2)
            k, v = k_cache, v_cache
        if seq <= FEW_QUERIES:
            out = few_query_attention(q, k, v, mask, self.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class ParallelLlamaMLP(nn.Module):
    """SwiGLU: gate and up column parallel, down row parallel (widths tp does not divide are padded).

    A mixture-of-experts layer builds its experts from it: their own width, the checkpoint's names
    (Mixtral's w1/w3/w2) and reduce_output=False, so the layer sums all experts with one all-reduce."""

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config, dtype, device, intermediate_size=None, names=NAMES, reduce_output: bool = True):
        super().__init__()
        hidden, inner = config.hidden_size, intermediate_size or config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        column = dict(bias=bias, gather_output=False, dtype=dtype, device=device, pad=True)
        self.names = names
        gate, up, down = names
        setattr(self, gate, ColumnParallelLinear(hidden, inner, **column))
        setattr(self, up, ColumnParallelLinear(hidden, inner, **column))
        down_proj = RowParallelLinear(
            inner, hidden, bias=bias, input_is_parallel=True, dtype=dtype, device=device, pad=True, reduce_output=reduce_output
        )
        setattr(self, down, down_proj)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        gated, upped = column_parallel_many([gate, up], x)
        return down(self.act_fn(gated) * upped)


class ParallelLlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype, device, arch: DecoderArch | None = None):
        super().__init__()
        arch = arch or llama_arch(config)
        self.self_attn = ParallelLlamaAttention(config, layer_idx, dtype, device, arch)
        # Under the checkpoint's name: "mlp", or Mixtral's "block_sparse_moe".
        self.mlp_name, mlp = arch.mlp(config, layer_idx, dtype, device)
        setattr(self, self.mlp_name, mlp)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)

    def forward(self, x, cos, sin, mask, cache_position=None, first_row: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_position, first_row)
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))


class ParallelLlamaModel(nn.Module):
    def __init__(self, config, dtype, device, arch: DecoderArch | None = None):
        super().__init__()
        arch = arch or llama_arch(config)
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device, pad=True)
        self.layers = nn.ModuleList(ParallelLlamaDecoderLayer(config, i, dtype, device, arch) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        self.rotary_emb = LlamaRotaryEmbedding(config)


def attention_mask_for(attention_mask, query_slots, num_slots: int, batch: int, window: int | None = None) -> torch.Tensor:
    """Boolean [batch, 1, queries, slots]: causal over slots, padding masked, and each query sees itself
    (so a left-padding query never has an empty row, which would turn into NaN).

    query_slots is [queries] (shared by the batch) or [batch, queries] (a slot per row and query).
    window (sliding-window attention): a query sees only the `window` slots up to its own, Hugging
    Face's `kv_idx > q_idx - sliding_window` over cache slots, in prefill and in decoding alike.
    """
    if query_slots.dim() == 1:
        query_slots = query_slots[None].expand(batch, -1)
    key_slots = torch.arange(num_slots, device=query_slots.device)
    mask = key_slots[None, None, :] <= query_slots[:, :, None]
    if window is not None:
        mask = mask & (key_slots[None, None, :] > query_slots[:, :, None] - window)
    if attention_mask is not None:
        valid = attention_mask.to(torch.bool)
        if valid.shape[1] < num_slots:
            valid = F.pad(valid, (0, num_slots - valid.shape[1]), value=False)
        mask = mask & valid[:, None, :num_slots]
    mask = mask | (key_slots[None, None, :] == query_slots[:, :, None])
    return mask[:, None]


class ParallelLlamaForCausalLM(nn.Module):
    """The causal LM of Llama and of the families built on its layers (Qwen2/3, Mistral, MoE), by arch."""

    def __init__(self, config, dtype: torch.dtype = torch.float32, device=None, arch: DecoderArch | None = None):
        super().__init__()
        self.config = config
        self.model = ParallelLlamaModel(config, dtype, device, arch)
        self.lm_head = ColumnParallelLinear(
            config.hidden_size, config.vocab_size, bias=False, gather_output=True, dtype=dtype, device=device, pad=True
        )
        if getattr(config, "tie_word_embeddings", False):
            # Same vocabulary split and padding: the two share one parameter, as in HF.
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_batch_size = self.max_seq_len = 0

    def allocate_kv_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        weight = self.lm_head.weight
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            cpu_kernels.prepare()  # bf16 decoding on CPU: the faster matrix-vector kernel
        if weight.device.type == "cpu":
            attention_kernel.prepare()
        for layer in self.model.layers:
            layer.self_attn.allocate_kv_cache(max_batch_size, max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache_position=None, last_only: bool = False, first_row: int = 0
    ) -> torch.Tensor:
        """Full-vocabulary logits [batch, seq, vocab] ([batch, 1, vocab] with last_only).

        cache_position (slot indices, [seq]) writes these tokens into the KV cache
        and attends over every slot; without it, a plain forward over input_ids.
        attention_mask [batch, slots so far] marks real tokens (0 = left padding).
        first_row: the KV-cache row of the batch's first row (continuous batching prefills one
        request's row while the other rows hold other requests).
        """
        batch, seq = input_ids.shape
        if cache_position is not None:
            if self.max_seq_len == 0:
                raise RuntimeError("no KV cache: call allocate_kv_cache(max_batch_size, max_seq_len) first")
            if first_row < 0 or first_row + batch > self.max_batch_size or int(cache_position.max()) >= self.max_seq_len:
                raise ValueError(
                    f"batch {batch} from row {first_row} at slot {int(cache_position.max())} exceeds the KV cache "
                    f"(max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len})"
                )
        return self.compute(input_ids, attention_mask, position_ids, cache_position, last_only, first_row)

    def compute(self, input_ids, attention_mask, position_ids, cache_position, last_only: bool, first_row: int = 0) -> torch.Tensor:
        """forward without the argument checks: only tensor work, so torch.compile sees one graph."""
        batch, seq = input_ids.shape
        if cache_position is None:
            query_slots, num_slots = torch.arange(seq, device=input_ids.device), seq
        else:
            query_slots, num_slots = cache_position, self.max_seq_len
        if position_ids is None:
            rows_slots = query_slots if query_slots.dim() == 2 else query_slots[None].expand(batch, -1)
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions.gather(1, rows_slots.clamp(max=positions.shape[1] - 1))
            else:
                position_ids = rows_slots
        # One mask per distinct window (full attention: None), shared by the layers that use it.
        masks = {}
        for layer in self.model.layers:
            window = layer.self_attn.sliding_window
            if window not in masks:
                masks[window] = attention_mask_for(attention_mask, query_slots, num_slots, batch, window)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(x, position_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, masks[layer.self_attn.sliding_window], cache_position, first_row)
        if last_only:
            x = x[:, -1:]  # generation needs the next token only: skip the vocabulary projection elsewhere
        return self.lm_head(self.model.norm(x))


def build(config, dtype: torch.dtype = torch.float32, device=None) -> ParallelLlamaForCausalLM:
    return ParallelLlamaForCausalLM(config, dtype=dtype, device=device)
