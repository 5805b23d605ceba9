"""Map our ``model``/``parallel``/``train`` sections onto megatron-core's ``TransformerConfig``.

Everything that megatron-core already offers (QK-norm, attention output gate, NoPE interleave via
``no_rope_freq``, GQA, MoE routing and balancing, recompute, FP8) is passed through here; nothing is re-built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.activations import squared_relu
from megatron.core.transformer import TransformerConfig

from betterai_megatron.config.model import ModelConfig
from betterai_megatron.config.parallel import ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sequence_parallel_enabled(*, model: ModelConfig, parallel: ParallelConfig) -> bool:
    """Explicit choice, else on exactly where megatron-core requires it (MoE with tp > 1)."""
    if parallel.sequence_parallel is not None:
        return parallel.sequence_parallel and parallel.tp > 1
    return model.is_moe and parallel.tp > 1


def no_rope_pattern(model: ModelConfig) -> list[int] | None:
    """megatron-core's ``no_rope_freq`` as an explicit 0/1 list (1 = this layer skips RoPE)."""
    if model.nope_layer_interval is not None:
        n = model.nope_layer_interval
        return [1 if (i + 1) % n == 0 else 0 for i in range(model.num_layers)]
    if model.nope_layers is not None:
        skip = set(model.nope_layers)
        return [1 if i + 1 in skip else 0 for i in range(model.num_layers)]
    return None


def _moe_kwargs(model: ModelConfig, use_transformer_engine: bool) -> dict:
    if not model.is_moe:
        return {}
    moe = model.moe
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size or model.resolved_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_layer_freq=moe.layer_freq,
        moe_router_load_balancing_type=moe.load_balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if moe.load_balancing != "none" else 0.0,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_router_score_function=moe.score_function,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor,
        # megatron-core's non-TE grouped GEMM needs the optional `grouped_gemm` package: sequential experts there
        moe_grouped_gemm=moe.grouped_gemm and use_transformer_engine,
        moe_router_pre_softmax=moe.router_topk == 1 and moe.score_function == "softmax",
        moe_router_dtype=moe.router_dtype,
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def build_transformer_config(
    *, model: ModelConfig, parallel: ParallelConfig, seq_length: int, use_transformer_engine: bool
) -> TransformerConfig:
    """The megatron-core config for this model at this layout."""
    dtype = _DTYPES[model.params_dtype]
    activation = {"swiglu": F.silu, "gelu": F.gelu, "squared_relu": squared_relu}[model.activation]
    recompute = {}
    if model.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif model.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method=model.recompute_method,
                         recompute_num_layers=model.recompute_num_layers)
    fp8 = {}
    if model.fp8 is not None:
        fp8 = dict(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
    vpp = parallel.vpp if parallel.vpp and parallel.vpp > 1 else None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.resolved_ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=activation,
        add_bias_linear=model.add_bias_linear,
        qk_layernorm=model.qk_layernorm,
        attention_output_gate=model.attention_output_gate,
        no_rope_freq=no_rope_pattern(model),
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
        sequence_parallel=sequence_parallel_enabled(model=model, parallel=parallel),
        # Per-token loss: the global-batch loss is the mean over all its tokens whatever the layout, which is
        # what makes every layout give the same numbers (and is right for SFT masks).
        calculate_per_token_loss=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,  # also sets the tensor-parallel attributes the layout-invariant init reads
        # Fusions need Apex/TE/CUDA; the TE spec brings its own.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        # Layers with different token mixers have different parameters: checkpoint them per layer (global layer
        # number in the key) instead of stacked along a layer axis. (megatron-core's field name is misspelled.)
        hetereogenous_dist_checkpoint=bool(model.layer_pattern and set(model.layer_pattern) - {"A"}),
        deallocate_pipeline_outputs=True,
        # gloo matches point-to-point messages between a pair of ranks by posting order; megatron's batched
        # send/recv posts forward and backward tensors in an order that swaps them when the interleaved
        # schedule wraps around (pp=2, vpp>1): verified wrong losses on gloo. Unbatched ops are ordered safely.
        batch_p2p_comm=torch.cuda.is_available(),
        **recompute,
        **fp8,
        **_moe_kwargs(model, use_transformer_engine),
    )
