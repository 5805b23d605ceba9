"""DeltaNet token mixer (Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", NeurIPS 2024, arXiv:2406.06484).

Per head: ``q, k, v`` from a projection and a short causal convolution with SiLU (section 3.3), ``q`` and ``k``
L2-normalised (the delta rule needs ``||k|| = 1`` to stay stable), ``beta = sigmoid(W_beta x)``, the delta-rule
recurrence ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, output ``o_t = S_t^T q_t / sqrt(d_k)``,
then per-head RMSNorm and the output gate ``silu(W_z x)`` (optional, ``model.linear_attention.output_gate``; fla's
DeltaNet layer has it off by default, the Gated DeltaNet paper uses it for both).
"""

from __future__ import annotations

import torch

from betterai_megatron.kernels import chunk_delta_rule, fused_recurrent_delta_rule
from betterai_megatron.kernels.cp_linear_attention import cp_chunk_delta_rule
from betterai_megatron.model.linear_attention.mixer import LinearAttentionMixer


class DeltaNetMixer(LinearAttentionMixer):
    """Layer-pattern letter ``D``."""

    def _layout(self):
        dk, dv = self.key_head_dim, self.value_head_dim
        layout = [("q", dk), ("k", dk), ("v", dv)]
        if self.linear_config.output_gate:
            layout.append(("z", dv))
        return layout + [("beta", 1)]

    def _mix(self, parts, hidden_states, *, initial_state, step, output_final_state):
        q, k, v = parts["q"], parts["k"], parts["v"]
        beta = parts["beta"].squeeze(-1).sigmoid()  # [b, s, H]
        if step:
            return fused_recurrent_delta_rule(
                q, k, v, beta, initial_state=initial_state, output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=True,
            )
        if self.cp_group is not None:  # recurrent state passed across the CP ranks
            return cp_chunk_delta_rule(q, k, v, beta, cp_group=self.cp_group, use_qk_l2norm_in_kernel=True,
                                       chunk_size=self.linear_config.chunk_size), None
        return chunk_delta_rule(
            q, k, v, beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=True, chunk_size=self.linear_config.chunk_size,
        )
