"""Gated linear attention token mixer (Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML 2024, arXiv:2312.06635).

Per head: ``q, k, v`` linear projections (no feature map, no normalisation, as in the paper), a data-dependent
per-key forget gate from a low-rank projection ``g_t = logsigmoid(W_2 W_1 x_t + b) / 16`` (rank 16, temperature 16,
section 4.4), the recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, output ``S_t^T q_t / sqrt(d_k)``, per-head
RMSNorm and the output gate ``swish(W_r x)``. The paper has no short convolution
(``model.linear_attention.gla_short_conv`` adds one, as fla allows).

Tensor parallelism of the gate: ``W_1`` (hidden -> 16) is replicated, ``W_2`` (16 -> heads * d_k) is a
``ColumnParallelLinear``. With sequence parallelism ``W_1`` sees only this rank's slice of the sequence, so its
weight is marked ``sequence_parallel`` and megatron's ``finalize_model_grads`` all-reduces its gradient over the
TP group (as for norms); without it, ``W_2``'s input-gradient all-reduce already makes ``W_1``'s gradient whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from betterai_megatron.kernels import chunk_gla, fused_recurrent_gla
from betterai_megatron.kernels.cp_linear_attention import cp_chunk_gla
from betterai_megatron.model.linear_attention.mixer import LinearAttentionMixer


class GLAMixer(LinearAttentionMixer):
    """Layer-pattern letter ``L``."""

    @property
    def conv_parts(self):  # type: ignore[override]
        return ("q", "k", "v") if self.linear_config.gla_short_conv else ()

    def _layout(self):
        dk, dv = self.key_head_dim, self.value_head_dim
        layout = [("q", dk), ("k", dk), ("v", dv)]
        if self.linear_config.output_gate:
            layout.append(("z", dv))
        return layout

    def _build_extra(self, config, lc):
        rank = lc.gla_gate_low_rank_dim
        self.gate_down = torch.nn.Linear(config.hidden_size, rank, bias=False, dtype=config.params_dtype,
                                         device=torch.cuda.current_device())
        self.gate_down.weight.sequence_parallel = bool(config.sequence_parallel)
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.gate_down.weight)
        self.gate_up = ColumnParallelLinear(
            rank, self.num_key_heads * self.key_head_dim, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False, tp_group=self.tp_group,
        )

    def _mix(self, parts, hidden_states, *, initial_state, step, output_final_state):
        batch, seq = parts["q"].shape[:2]
        gate_logits, _ = self.gate_up(self.gate_down(hidden_states))  # [s, b, local_heads * dk]
        gk = F.logsigmoid(gate_logits.float()) / self.linear_config.gla_gate_normalizer
        gk = gk.transpose(0, 1).reshape(batch, seq, self.local_key_heads, self.key_head_dim)
        q, k, v = parts["q"], parts["k"], parts["v"]
        if step:
            return fused_recurrent_gla(q, k, v, gk=gk.to(q.dtype), initial_state=initial_state,
                                       output_final_state=output_final_state)
        if self.cp_group is not None:  # recurrent state passed across the CP ranks
            return cp_chunk_gla(q, k, v, gk.to(q.dtype), cp_group=self.cp_group,
                                chunk_size=self.linear_config.chunk_size), None
        return chunk_gla(q, k, v, gk.to(q.dtype), initial_state=initial_state, output_final_state=output_final_state,
                         chunk_size=self.linear_config.chunk_size)
