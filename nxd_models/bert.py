"""Parallel BERT: the bare encoder and its sequence classification and masked LM heads.

Module paths and parameter names are Hugging Face's (`BertModel`,
`BertForSequenceClassification`, `BertForMaskedLM`), so an HF checkpoint
loads by name. The plan:

    attention.self.query/key/value   ColumnParallelLinear (heads split)
    attention.output.dense           RowParallelLinear
    intermediate.dense               ColumnParallelLinear;  output.dense  RowParallelLinear (padded if tp does not divide it)
    embeddings.word_embeddings       ParallelEmbedding over the vocabulary (padded)
    cls.predictions.decoder          ColumnParallelLinear over the vocabulary, gathered, tied to word_embeddings
    position/token-type embeddings, LayerNorms, pooler, classifier   replicated

The word embeddings are vocabulary-parallel, not replicated: they are the
largest single tensor (a fifth of bert-base) and the masked-LM decoder shares
them, so splitting them keeps every rank near 1/tp of the weights and gives
the decoder its vocabulary split for free. The small tables and heads are
replicated: splitting them would cost a collective for a few kilobytes.

The guide's recipe, `parallelize_self_attention`, which swaps the layers of
an existing HF model in place, stays below for training scripts.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertSelfAttention, BertSelfOutput

from nxd_core import parallel_state as ps
from nxd_core.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

# The family contract (nxd_models.families.Family).
MODEL_TYPES = ("bert",)
HANDLE = "encoder"
KV_CACHE = False  # an encoder keeps no cache
# Recomputed buffers, the pre-training next-sentence head, and the decoder bias HF stores twice.
IGNORED_CHECKPOINT_NAMES = re.compile(
    r"(^|\.)embeddings\.(position_ids|token_type_ids)$|^cls\.seq_relationship\.|^cls\.predictions\.decoder\.bias$"
)
# Old TF-converted checkpoints (bert-base-uncased) name LayerNorm parameters gamma/beta.
_LEGACY_NAMES = ((re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"), (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"))
ARCHITECTURES = ("BertForSequenceClassification", "BertForMaskedLM", "BertModel")


def default_max_seq_len(config) -> int:
    return config.max_position_embeddings


def valid_tp_values(config) -> list[int]:
    return ps.divisors(config.num_attention_heads)


def check_tp(config, tp: int) -> None:
    if tp not in valid_tp_values(config):
        raise ValueError(
            f"tp={tp} cannot shard this BERT config ({config.num_attention_heads} attention heads): "
            f"valid tp values are {valid_tp_values(config)}"
        )


class ParallelBertSelfAttention(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        common = dict(gather_output=False, dtype=dtype, device=device, unit=self.head_dim)
        self.query = ColumnParallelLinear(config.hidden_size, config.hidden_size, **common)
        self.key = ColumnParallelLinear(config.hidden_size, config.hidden_size, **common)
        self.value = ColumnParallelLinear(config.hidden_size, config.hidden_size, **common)

    def forward(self, x, mask):
        batch, seq, _ = x.shape
        q, k, v = (proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, seq, -1)  # this rank's heads, ready for the row-parallel output


class ParallelBertAttentionOutput(nn.Module):
    def __init__(self, config, input_size, dtype, device, **split):
        super().__init__()
        self.dense = RowParallelLinear(input_size, config.hidden_size, input_is_parallel=True, dtype=dtype, device=device, **split)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class ParallelBertAttention(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.self = ParallelBertSelfAttention(config, dtype, device)
        self.output = ParallelBertAttentionOutput(config, config.hidden_size, dtype, device, unit=self.self.head_dim)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class ParallelBertIntermediate(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.dense = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, gather_output=False, dtype=dtype, device=device, pad=True
        )
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class ParallelBertLayer(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.attention = ParallelBertAttention(config, dtype, device)
        self.intermediate = ParallelBertIntermediate(config, dtype, device)
        self.output = ParallelBertAttentionOutput(config, config.intermediate_size, dtype, device, pad=True)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class ParallelBertEncoder(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.layer = nn.ModuleList(ParallelBertLayer(config, dtype, device) for _ in range(config.num_hidden_layers))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class ParallelBertEmbeddings(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.word_embeddings = ParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device, pad=True)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype, device=device)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x)


class ParallelBertPooler(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class ParallelBertModel(nn.Module):
    """The bare encoder; forward returns the last hidden states [batch, seq, hidden]."""

    def __init__(self, config, dtype=torch.float32, device=None, add_pooling_layer: bool = True):
        super().__init__()
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type={position_type!r} is not supported; nxd-zoo's BERT has absolute positions")
        self.config = config
        self.embeddings = ParallelBertEmbeddings(config, dtype, device)
        self.encoder = ParallelBertEncoder(config, dtype, device)
        self.pooler = ParallelBertPooler(config, dtype, device) if add_pooling_layer else None

    def encode(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None
        if attention_mask is not None:  # [batch, 1, 1, keys]: padded keys are never attended to
            mask = attention_mask.to(torch.bool)[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.encode(input_ids, attention_mask, token_type_ids)


class ParallelBertForSequenceClassification(nn.Module):
    """forward returns logits [batch, num_labels]."""

    def __init__(self, config, dtype=torch.float32, device=None):
        super().__init__()
        self.config = config
        self.bert = ParallelBertModel(config, dtype, device)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels, dtype=dtype, device=device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        hidden = self.bert.encode(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.bert.pooler(hidden))


class ParallelBertPredictionHeadTransform(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype, device=device)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, x):
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class ParallelBertLMPredictionHead(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.transform = ParallelBertPredictionHeadTransform(config, dtype, device)
        self.decoder = ColumnParallelLinear(
            config.hidden_size, config.vocab_size, bias=False, gather_output=True, dtype=dtype, device=device, pad=True
        )
        # Added after the gather, so it is a replicated full-vocabulary vector (HF's name).
        self.bias = nn.Parameter(torch.zeros(config.vocab_size, dtype=dtype, device=device))

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class ParallelBertOnlyMLMHead(nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.predictions = ParallelBertLMPredictionHead(config, dtype, device)


class ParallelBertForMaskedLM(nn.Module):
    """forward returns full-vocabulary logits [batch, seq, vocab]."""

    def __init__(self, config, dtype=torch.float32, device=None):
        super().__init__()
        self.config = config
        self.bert = ParallelBertModel(config, dtype, device, add_pooling_layer=False)
        self.cls = ParallelBertOnlyMLMHead(config, dtype, device)
        # HF always ties the decoder to the word embeddings; same vocabulary split and padding.
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.cls.predictions(self.bert.encode(input_ids, attention_mask, token_type_ids))


_HEADS = {
    "BertForSequenceClassification": ParallelBertForSequenceClassification,
    "BertForMaskedLM": ParallelBertForMaskedLM,
    "BertModel": ParallelBertModel,
}


def architecture(config) -> str:
    """The HF class this checkpoint was saved from (config.architectures), among those we build."""
    for name in getattr(config, "architectures", None) or ["BertModel"]:
        if name in _HEADS:
            return name
    raise ValueError(
        f"BERT architectures {config.architectures} are not supported; nxd-zoo builds {sorted(_HEADS)} "
        "(edit config.json's architectures to load the encoder under one of them)"
    )


def build(config, dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    check_tp(config, ps.get_tensor_model_parallel_size())
    return _HEADS[architecture(config)](config, dtype=dtype, device=device)


def adapt_checkpoint(tensors: dict, model: nn.Module) -> dict:
    """Checkpoint names -> this model's names: legacy gamma/beta renamed, heads the model lacks dropped
    (a pre-training checkpoint's pooler when building the masked-LM head, a classifier when building the bare model)."""
    wanted = set(model.state_dict().keys())
    adapted = {}
    for name, tensor in tensors.items():
        for pattern, replacement in _LEGACY_NAMES:
            name = pattern.sub(replacement, name)
        if isinstance(model, ParallelBertModel) and name.startswith("bert."):
            name = name[len("bert.") :]  # a task checkpoint loaded as the bare encoder
        if name in wanted or not re.match(r"(bert\.)?pooler\.|cls\.|classifier\.", name):
            adapted[name] = tensor
    return adapted


# -- the NxD guide's recipe: parallelize an existing HF BERT in place ---------------------------


class ParallelSelfAttention(BertSelfAttention):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        tp = ps.get_tensor_model_parallel_size()
        ps.divide(self.num_attention_heads, tp, "num_attention_heads")
        dtype = self.query.weight.dtype
        self.query = ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False, dtype=dtype)
        self.key = ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False, dtype=dtype)
        self.value = ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False, dtype=dtype)
        # Each rank now holds num_attention_heads / tp heads.
        self.num_attention_heads //= tp
        self.all_head_size //= tp


class ParallelSelfOutput(BertSelfOutput):
    def __init__(self, config):
        super().__init__(config)
        dtype = self.dense.weight.dtype
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, input_is_parallel=True, dtype=dtype)


def parallelize_self_attention(model):
    """Swap a Hugging Face BERT's self-attention for the parallel one, in place; return the model.

    The swapped layers are freshly initialised: load the weights afterwards.
    """
    bert = model.bert if hasattr(model, "bert") else model
    for layer in bert.encoder.layer:
        old = layer.attention.self
        layer.attention.self = ParallelSelfAttention(model.config, is_causal=old.is_causal, layer_idx=old.layer_idx)
        layer.attention.output = ParallelSelfOutput(model.config)
    return model
