"""Parallel mixtures of experts: Mixtral and Qwen3-MoE, on Llama's (Mistral's, Qwen3's) attention.

The sparse layer, as Hugging Face computes it:

    gate      a replicated linear router: logits in the model's dtype, softmax in float32, top-k;
              Mixtral always renormalises the k weights (and keeps them in float32), Qwen3-MoE when
              `norm_topk_prob` (and casts them back to the model's dtype)
    experts   SwiGLU MLPs, each sharded over tp as the dense MLP is (gate/up column parallel, down
              row parallel, widths padded); the down projections' partial sums are weighted and
              added up locally, and one all-reduce per layer sums them over the ranks

Only the experts some token selected run (decoding touches k experts per row, not all of them);
experts that got no token cost nothing. Routing is computed identically on every rank (the same
replicated input and router), and no collective sits inside the loop over experts.

Parameter names are the checkpoints' (Mixtral: `block_sparse_moe.gate`, `experts.N.w1/w3/w2`;
Qwen3-MoE: `mlp.gate`, `mlp.experts.N.gate_proj/up_proj/down_proj`), so load, convert, reshard and
consolidate use the one sharding path. Qwen3-MoE mixes dense and sparse layers
(`mlp_only_layers`, `decoder_sparse_step`) exactly as Qwen3MoeDecoderLayer decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nxd_core import parallel_state as ps
from nxd_core.mappings import reduce_from_tensor_model_parallel_region

from . import llama
from .llama import DecoderArch, ParallelLlamaForCausalLM, ParallelLlamaMLP, sliding_windows

# The family contract (nxd_models.families.Family).
MODEL_TYPES = ("mixtral", "qwen3_moe")
HANDLE = "causal"
KV_CACHE = True
IGNORED_CHECKPOINT_NAMES = llama.IGNORED_CHECKPOINT_NAMES
adapt_checkpoint = llama.adapt_checkpoint
default_max_seq_len = llama.default_max_seq_len
valid_tp_values = llama.valid_tp_values

_NAMES = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE"}
MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


def check_tp(config, tp: int) -> None:
    llama.check_tp(config, tp, _NAMES[config.model_type])


class ParallelSparseMoeBlock(nn.Module):
    def __init__(self, config, dtype, device, num_experts: int, intermediate_size: int, names, normalize: bool, fp32_weights: bool):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize, self.fp32_weights = normalize, fp32_weights
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False, dtype=dtype, device=device)
        self.experts = nn.ModuleList(
            ParallelLlamaMLP(config, dtype, device, intermediate_size, names=names, reduce_output=False) for _ in range(num_experts)
        )
        self.tp = ps.get_tensor_model_parallel_size()  # at build time: a replicated copy (tp=1) never reduces

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, k], experts [tokens, k]) for x [tokens, hidden], as Hugging Face's router."""
        logits = F.linear(x, self.gate.weight)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.fp32_weights else weights.to(logits.dtype)), chosen

    # Which experts run depends on the data: compiled decoding runs this part eagerly (traced, each
    # new choice of experts would recompile the step) and compiles the rest of the layer.
    @torch.compiler.disable
    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the chosen experts' weighted outputs, running only the experts some
        token chose, each over the tokens that chose it."""
        out = torch.zeros_like(x)
        for expert in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == expert)
            partial = self.experts[expert](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, partial.to(out.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        out = self.dispatch(x, weights, chosen)
        if self.tp > 1:
            out = reduce_from_tensor_model_parallel_region(out)  # one all-reduce for all experts
        return out.view(shape)


def mixtral_mlp(config, layer_idx: int, dtype, device) -> tuple[str, nn.Module]:
    block = ParallelSparseMoeBlock(
        config, dtype, device, config.num_local_experts, config.intermediate_size, MIXTRAL_EXPERT_NAMES, normalize=True, fp32_weights=True
    )
    return "block_sparse_moe", block


def is_sparse_layer(config, layer_idx: int) -> bool:
    """Qwen3MoeDecoderLayer's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
    return layer_idx not in config.mlp_only_layers and config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0


def qwen3_moe_mlp(config, layer_idx: int, dtype, device) -> tuple[str, nn.Module]:
    if not is_sparse_layer(config, layer_idx):
        return "mlp", ParallelLlamaMLP(config, dtype, device)
    block = ParallelSparseMoeBlock(
        config,
        dtype,
        device,
        config.num_experts,
        config.moe_intermediate_size,
        ParallelLlamaMLP.NAMES,
        normalize=config.norm_topk_prob,
        fp32_weights=False,
    )
    return "mlp", block


def arch(config) -> DecoderArch:
    windows = sliding_windows(config, by_layer_types=False)
    if config.model_type == "mixtral":  # Mistral's attention
        return DecoderArch(windows=windows, mlp=mixtral_mlp)
    bias = config.attention_bias  # Qwen3's attention
    return DecoderArch(qkv_bias=bias, o_bias=bias, qk_norm=True, windows=windows, mlp=qwen3_moe_mlp)


def build(config, dtype: torch.dtype = torch.float32, device=None) -> ParallelLlamaForCausalLM:
    return ParallelLlamaForCausalLM(config, dtype=dtype, device=device, arch=arch(config))
