"""Named model presets (``model.preset``). Each is a plain dict of ``model.*`` fields.

* ``tiny`` / ``tiny-moe``: seconds on a CPU; what the tests, the demo and layout debugging use.
* ``code-1b``: a ~1.1B dense Llama-style code model (22 layers, 2048 hidden, GQA 32/4, SwiGLU, RoPE), sized for
  one node of 8 GPUs with plain data parallelism (or tp=2 for longer sequences).
* ``deepseek-v3-style-16b``: a DeepSeek-V3-style MoE (~16B total, ~2.7B active): fine-grained experts (64 routed,
  top-6, plus 2 shared), a dense first layer, sigmoid routing scores with aux-loss-free expert bias and a small
  sequence-level aux loss (DeepSeek-V3, sec. 2.1.2); GQA instead of MLA. Sized for 8 GPUs with ep=8.
"""

from __future__ import annotations

import copy

from betterai_megatron.config.loader import ConfigError

PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=512, normalization="RMSNorm", activation="swiglu", position_embedding="rope",
        qk_layernorm=True, tie_embeddings=True,
    ),
    "tiny-moe": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=512, normalization="RMSNorm", activation="swiglu", position_embedding="rope",
        qk_layernorm=True, tie_embeddings=True,
        moe=dict(num_experts=4, router_topk=2, ffn_hidden_size=64, shared_expert_ffn_hidden_size=64,
                 load_balancing="aux_loss", aux_loss_coeff=1e-2, z_loss_coeff=1e-3),
    ),
    "code-1b": dict(
        num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32, num_query_groups=4,
        vocab_size=32000, normalization="RMSNorm", activation="swiglu", position_embedding="rope",
        rotary_base=100000, tie_embeddings=False, params_dtype="bf16", recompute="selective",
    ),
    "deepseek-v3-style-16b": dict(
        num_layers=28, hidden_size=2048, ffn_hidden_size=10944, num_attention_heads=16, num_query_groups=16,
        kv_channels=128, vocab_size=102400, normalization="RMSNorm", activation="swiglu",
        position_embedding="rope", rotary_base=10000, qk_layernorm=True, tie_embeddings=False,
        params_dtype="bf16", recompute="selective",
        moe=dict(num_experts=64, router_topk=6, ffn_hidden_size=1408, shared_expert_ffn_hidden_size=2816,
                 layer_freq=[0] + [1] * 27, load_balancing="seq_aux_loss", aux_loss_coeff=1e-4,
                 expert_bias=True, expert_bias_update_rate=1e-3, score_function="sigmoid",
                 token_dispatcher="alltoall", grouped_gemm=True),
    ),
}


def get_preset(name: str) -> dict:
    """The preset's fields (a copy). Unknown names list the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is not a preset; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
