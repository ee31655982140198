"""Parallel T5: T5 v1.0 (t5-small .. t5-3b) and v1.1 / Flan-T5 (gated GELU, untied lm_head).

Module paths and parameter names are Hugging Face's `T5ForConditionalGeneration`,
so an HF checkpoint loads by name. The plan:

    q, k, v                   ColumnParallelLinear (heads split)
    o                         RowParallelLinear
    relative_attention_bias   an embedding [buckets, heads] split over heads (dim 1): each rank biases its own heads
    wi / wi_0, wi_1           ColumnParallelLinear;  wo  RowParallelLinear (padded when tp does not divide d_ff)
    shared (= embed_tokens)   ParallelEmbedding over the vocabulary (padded)
    lm_head                   ColumnParallelLinear over the vocabulary, gathered; tied to `shared` in v1.0
    layer norms               replicated (Hugging Face's T5LayerNorm)

T5 does not scale q.k by 1/sqrt(d). v1.0 ties lm_head to the embedding and
rescales the decoder output by d_model**-0.5 first.

Decoding state lives in the workers: the decoder's self-attention KV cache is
preallocated and written in place at `cache_position`; the cross-attention
K/V are computed once per encoding (`start_decoding`) and kept until the next.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

from nxd_core import parallel_state as ps
from nxd_core.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from nxd_core.sharding import ShardSpec, set_sharding, shard_tensor, tag_sharded_state

# The family contract (nxd_models.families.Family).
MODEL_TYPES = ("t5",)
HANDLE = "seq2seq"
KV_CACHE = True  # the decoder's self-attention
# HF's own ignore list: an old export stored a cross-attention bias that T5 never uses.
IGNORED_CHECKPOINT_NAMES = re.compile(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")
# T5 has relative positions, so no maximum length; this is the decoder KV cache's default length.
DEFAULT_MAX_SEQ_LEN = 512


def default_max_seq_len(config) -> int:
    return getattr(config, "n_positions", None) or DEFAULT_MAX_SEQ_LEN


def valid_tp_values(config) -> list[int]:
    return ps.divisors(config.num_heads)


def check_tp(config, tp: int) -> None:
    if tp not in valid_tp_values(config):
        raise ValueError(
            f"tp={tp} cannot shard this T5 config ({config.num_heads} attention heads): valid tp values are {valid_tp_values(config)}"
        )


def scales_decoder_output(config) -> bool:
    """Does the decoder output get the d_model**-0.5 rescale before lm_head? (v1.0 yes, v1.1 no.)
    transformers 5 configs say so in scale_decoder_outputs; older ones by tie_word_embeddings."""
    return bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias with the heads dim sharded: `weight` is [buckets, heads / tp]."""

    def __init__(self, config, bidirectional: bool, dtype, device):
        super().__init__()
        self.register_state_dict_post_hook(tag_sharded_state)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
        spec = ShardSpec(dim=1, full_size=config.num_heads, tp=ps.get_tensor_model_parallel_size())
        full_shape = (self.num_buckets, config.num_heads)
        if torch.device(device or torch.get_default_device()).type == "meta":
            data = torch.empty(full_shape[0], spec.shard_size, dtype=dtype, device=device)
        else:  # draw the full table and keep this rank's heads, as the parallel layers do
            full = torch.empty(full_shape, dtype=dtype, device=device).normal_()
            data = shard_tensor(full, spec, ps.get_tensor_model_parallel_rank())
        self.weight = nn.Parameter(data)
        set_sharding(self.weight, spec)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """[1, local heads, queries, keys]."""
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = T5Attention._relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1)[None]


class ParallelT5Attention(nn.Module):
    def __init__(self, config, has_relative_attention_bias: bool, bidirectional: bool, dtype, device):
        super().__init__()
        self.d_kv = config.d_kv
        inner = config.num_heads * config.d_kv
        common = dict(bias=False, gather_output=False, dtype=dtype, device=device, unit=config.d_kv)
        self.q = ColumnParallelLinear(config.d_model, inner, **common)
        self.k = ColumnParallelLinear(config.d_model, inner, **common)
        self.v = ColumnParallelLinear(config.d_model, inner, **common)
        self.o = RowParallelLinear(inner, config.d_model, bias=False, input_is_parallel=True, dtype=dtype, device=device, unit=config.d_kv)
        if has_relative_attention_bias:
            self.relative_attention_bias = RelativePositionBias(config, bidirectional, dtype, device)
        self.local_heads = self.q.spec.shard_size // self.d_kv
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def heads(self, x):
        return x.view(x.shape[0], x.shape[1], -1, self.d_kv).transpose(1, 2)

    def project_kv(self, states):
        return self.heads(self.k(states)), self.heads(self.v(states))

    def allocate_kv_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        shape = (max_batch_size, self.local_heads, max_seq_len, self.d_kv)
        weight = self.k.weight
        self.k_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)

    def forward(self, x, bias, k=None, v=None, cache_position=None):
        """Self-attention over x (written into the KV cache at cache_position when given), or attention
        over given k, v (cross-attention). bias: additive [*, heads, queries, keys], mask included."""
        batch, seq, _ = x.shape
        q = self.heads(self.q(x))
        if k is None:
            k, v = self.project_kv(x)
            if cache_position is not None:
                k_cache, v_cache = self.k_cache[:batch], self.v_cache[:batch]
                k_cache.index_copy_(2, cache_position, k)
                v_cache.index_copy_(2, cache_position, v)
                k, v = k_cache, v_cache
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(batch, seq, -1))


class ParallelT5DenseActDense(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        column = dict(bias=False, gather_output=False, dtype=dtype, device=device, pad=True)
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = ColumnParallelLinear(config.d_model, config.d_ff, **column)
            self.wi_1 = ColumnParallelLinear(config.d_model, config.d_ff, **column)
        else:
            self.wi = ColumnParallelLinear(config.d_model, config.d_ff, **column)
        self.wo = RowParallelLinear(config.d_ff, config.d_model, bias=False, input_is_parallel=True, dtype=dtype, device=device, pad=True)
        self.act = ACT2FN[config.dense_act_fn]

    def forward(self, x):
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(hidden)


def _norm(config, dtype, device):
    return T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon).to(dtype=dtype, device=device)


class ParallelT5LayerSelfAttention(nn.Module):
    def __init__(self, config, has_bias: bool, bidirectional: bool, dtype, device):
        super().__init__()
        self.SelfAttention = ParallelT5Attention(config, has_bias, bidirectional, dtype, device)
        self.layer_norm = _norm(config, dtype, device)

    def forward(self, x, bias, cache_position=None):
        return x + self.SelfAttention(self.layer_norm(x), bias, cache_position=cache_position)


class ParallelT5LayerCrossAttention(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.EncDecAttention = ParallelT5Attention(config, False, False, dtype, device)
        self.layer_norm = _norm(config, dtype, device)
        self.register_buffer("cross_k", None, persistent=False)
        self.register_buffer("cross_v", None, persistent=False)

    def forward(self, x, bias):
        return x + self.EncDecAttention(self.layer_norm(x), bias, self.cross_k, self.cross_v)


class ParallelT5LayerFF(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.DenseReluDense = ParallelT5DenseActDense(config, dtype, device)
        self.layer_norm = _norm(config, dtype, device)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class ParallelT5Block(nn.Module):
    def __init__(self, config, is_decoder: bool, has_bias: bool, dtype, device):
        super().__init__()
        layers = [ParallelT5LayerSelfAttention(config, has_bias, not is_decoder, dtype, device)]
        if is_decoder:
            layers.append(ParallelT5LayerCrossAttention(config, dtype, device))
        layers.append(ParallelT5LayerFF(config, dtype, device))
        self.layer = nn.ModuleList(layers)


class ParallelT5Stack(nn.Module):
    def __init__(self, config, embed_tokens, is_decoder: bool, dtype, device):
        super().__init__()
        self.embed_tokens = embed_tokens
        layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(ParallelT5Block(config, is_decoder, i == 0, dtype, device) for i in range(layers))
        self.final_layer_norm = _norm(config, dtype, device)

    def position_bias(self, query_positions, key_positions):
        """The first block's relative position bias, shared by every block (as in HF)."""
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(query_positions, key_positions)


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean keep-mask -> 0 where kept, the dtype's minimum where masked (HF's convention)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class ParallelT5ForConditionalGeneration(nn.Module):
    def __init__(self, config, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        self.shared = ParallelEmbedding(config.vocab_size, config.d_model, dtype=dtype, device=device, pad=True)
        self.encoder = ParallelT5Stack(config, self.shared, False, dtype, device)
        self.decoder = ParallelT5Stack(config, self.shared, True, dtype, device)
        self.lm_head = ColumnParallelLinear(
            config.d_model, config.vocab_size, bias=False, gather_output=True, dtype=dtype, device=device, pad=True
        )
        self.scale_output = scales_decoder_output(config)
        if self.scale_output:  # v1.0: the head is the embedding (same vocabulary split and padding)
            self.tie_lm_head()
        self.max_batch_size = self.max_seq_len = 0
        self.register_buffer("cross_bias", None, persistent=False)

    def tie_lm_head(self) -> None:
        self.lm_head.weight = self.shared.weight

    # -- encoder ------------------------------------------------------------------------------

    def encode(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The encoder's last hidden states [batch, seq, d_model]."""
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        x = self.shared(input_ids)
        bias = self.encoder.position_bias(positions, positions)
        if attention_mask is not None:
            bias = bias + _additive(attention_mask.to(torch.bool)[:, None, None, :], bias.dtype)
        for block in self.encoder.block:
            x = block.layer[0](x, bias)
            x = block.layer[1](x)
        return self.encoder.final_layer_norm(x)

    # -- decoder ------------------------------------------------------------------------------

    def allocate_kv_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        for block in self.decoder.block:
            block.layer[0].SelfAttention.allocate_kv_cache(max_batch_size, max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def start_decoding(self, encoder_hidden: torch.Tensor, attention_mask=None) -> None:
        """Compute every decoder layer's cross-attention K/V once for this encoding and keep them."""
        batch, seq, _ = encoder_hidden.shape
        if batch > self.max_batch_size:
            raise ValueError(f"batch {batch} exceeds the KV cache's max_batch_size={self.max_batch_size}")
        for block in self.decoder.block:
            cross = block.layer[1]
            cross.cross_k, cross.cross_v = cross.EncDecAttention.project_kv(encoder_hidden)
        keep = (
            torch.ones(batch, seq, dtype=torch.bool, device=encoder_hidden.device)
            if attention_mask is None
            else attention_mask.to(torch.bool)
        )
        self.cross_bias = _additive(keep[:, None, None, :], encoder_hidden.dtype)

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Row i of every cache becomes row rows[i] (beam search keeps the best beams' histories)."""
        n = rows.shape[0]
        for block in self.decoder.block:
            attention = block.layer[0].SelfAttention
            attention.k_cache[:n] = attention.k_cache[:n].index_select(0, rows)
            attention.v_cache[:n] = attention.v_cache[:n].index_select(0, rows)
            cross = block.layer[1]
            cross.cross_k, cross.cross_v = cross.cross_k.index_select(0, rows), cross.cross_v.index_select(0, rows)
        self.cross_bias = self.cross_bias.index_select(0, rows)

    def decode(self, decoder_input_ids, cache_position) -> torch.Tensor:
        """Logits [batch, seq, vocab] for decoder tokens written at KV-cache slots cache_position ([seq]);
        each attends to the slots up to its own and to the encoding given to start_decoding."""
        if self.cross_bias is None:
            raise RuntimeError("no encoding: call start_decoding(encoder_hidden, attention_mask) first")
        if int(cache_position.max()) >= self.max_seq_len or decoder_input_ids.shape[0] > self.max_batch_size:
            raise ValueError(
                f"batch {decoder_input_ids.shape[0]} at slot {int(cache_position.max())} exceeds the KV cache "
                f"(max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len})"
            )
        slots = torch.arange(self.max_seq_len, device=decoder_input_ids.device)
        bias = self.decoder.position_bias(cache_position, slots)
        bias = bias + _additive((slots[None, :] <= cache_position[:, None])[None, None], bias.dtype)
        x = self.shared(decoder_input_ids)
        for block in self.decoder.block:
            x = block.layer[0](x, bias, cache_position)
            x = block.layer[1](x, self.cross_bias)
            x = block.layer[2](x)
        x = self.decoder.final_layer_norm(x)
        if self.scale_output:
            x = x * self.config.d_model**-0.5
        return self.lm_head(x)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None) -> torch.Tensor:
        """Teacher-forced logits [batch, decoder_seq, vocab] (uses the KV cache from slot 0)."""
        self.start_decoding(self.encode(input_ids, attention_mask), attention_mask)
        slots = torch.arange(decoder_input_ids.shape[1], device=decoder_input_ids.device)
        return self.decode(decoder_input_ids, slots)


def build(config, dtype: torch.dtype = torch.float32, device=None) -> ParallelT5ForConditionalGeneration:
    check_tp(config, ps.get_tensor_model_parallel_size())
    return ParallelT5ForConditionalGeneration(config, dtype=dtype, device=device)


def adapt_checkpoint(tensors: dict, model: ParallelT5ForConditionalGeneration) -> dict:
    """Tie lm_head to the embedding when the checkpoint has no lm_head.weight (transformers 5 always
    saves it tied); untied checkpoints (Flan-T5) keep their own."""
    if "lm_head.weight" not in tensors and model.lm_head.weight is not model.shared.weight:
        model.tie_lm_head()
    return tensors
