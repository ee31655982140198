"""BERT with tensor parallel self-attention: the NxD tensor parallel guide's recipe.

In a Hugging Face BERT, each BertSelfAttention's query/key/value become
ColumnParallelLinear(gather_output=False) with the head counts divided by tp,
and each BertSelfOutput.dense becomes RowParallelLinear(input_is_parallel=True).
Parameter names stay Hugging Face's, so an unsharded HF state dict loads with
`nxd_core.checkpoint.load(path, model, sharded=False)`.
"""

from __future__ import annotations

from transformers.models.bert.modeling_bert import BertSelfAttention, BertSelfOutput

from nxd_core import parallel_state as ps
from nxd_core.layers import ColumnParallelLinear, RowParallelLinear


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
