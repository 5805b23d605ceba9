"""Gated DeltaNet token mixer (Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", ICLR 2025, arXiv:2412.06464; the linear layers of Qwen3-Next).

Per head: short causal convolution + SiLU on ``q, k, v``, L2-normalised ``q, k``, ``beta = sigmoid(W_beta x)``,
a Mamba2-style decay ``alpha_t = exp(g_t)`` with ``g_t = -exp(A_log) * softplus(W_a x + dt_bias)``, the gated
delta rule ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, output ``S_t^T q_t / sqrt(d_k)``,
per-head RMSNorm and the output gate ``silu(W_z x)``. Grouped value heads (``num_value_heads`` a multiple of
``num_heads``, as in Qwen3-Next) are supported. Initialisation as Mamba2/fla: ``A ~ U(1, 16)``,
``dt ~ logU(1e-3, 1e-1)`` and ``dt_bias = softplus^-1(dt)``.
"""

from __future__ import annotations

import math

import numpy as np

import torch

from betterai_megatron.kernels import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from betterai_megatron.kernels.cp_linear_attention import cp_chunk_gated_delta_rule
from betterai_megatron.model.linear_attention.mixer import LinearAttentionMixer
from megatron.core.tensor_parallel import get_cuda_rng_tracker


class GatedDeltaNetMixer(LinearAttentionMixer):
    """Layer-pattern letter ``G``."""

    grouped_values = True

    def _layout(self):
        dk, dv, r = self.key_head_dim, self.value_head_dim, self.values_per_key
        layout = [("q", dk), ("k", dk), ("v", r * dv)]
        if self.linear_config.output_gate:
            layout.append(("z", r * dv))
        return layout + [("beta", r), ("alpha", r)]

    def _build_extra(self, config, lc):
        low, high = lc.gdn_a_init_range
        log_dt_low, log_dt_high = math.log(lc.gdn_dt_init_range[0]), math.log(lc.gdn_dt_init_range[1])

        def dt_bias_init(u):
            dt = np.maximum(np.exp(log_dt_low + (log_dt_high - log_dt_low) * u), 1e-4)
            return dt + np.log(-np.expm1(-dt))  # softplus^-1(dt)

        self._local_parameter("A_log", self.local_value_heads, init=lambda u: np.log(low + (high - low) * u))
        self._local_parameter("dt_bias", self.local_value_heads, init=dt_bias_init)

    def _reset_extra(self):
        if not self.config.perform_initialization:
            return
        low, high = self.linear_config.gdn_a_init_range
        dt_low, dt_high = self.linear_config.gdn_dt_init_range
        with get_cuda_rng_tracker().fork():
            decay_rate = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(low, high)
            dt = torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(math.log(dt_low), math.log(dt_high))
        dt = dt.exp().clamp_min(1e-4)
        self.A_log.copy_(decay_rate.log())
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def _mix(self, parts, hidden_states, *, initial_state, step, output_final_state):
        batch, seq, heads = parts["q"].shape[:3]
        v = parts["v"].reshape(batch, seq, self.local_value_heads, self.value_head_dim)
        beta = parts["beta"].reshape(batch, seq, self.local_value_heads).sigmoid()
        alpha = parts["alpha"].reshape(batch, seq, self.local_value_heads)
        g = -self.A_log.float().exp() * torch.nn.functional.softplus(alpha.float() + self.dt_bias.float())
        kwargs = dict(initial_state=initial_state, output_final_state=output_final_state,
                      use_qk_l2norm_in_kernel=True)
        if step:
            return fused_recurrent_gated_delta_rule(parts["q"], parts["k"], v, g=g, beta=beta, **kwargs)
        if self.cp_group is not None:  # recurrent state passed across the CP ranks
            return cp_chunk_gated_delta_rule(parts["q"], parts["k"], v, g, beta, cp_group=self.cp_group,
                                             use_qk_l2norm_in_kernel=True,
                                             chunk_size=self.linear_config.chunk_size), None
        return chunk_gated_delta_rule(parts["q"], parts["k"], v, g, beta, chunk_size=self.linear_config.chunk_size,
                                      **kwargs)
