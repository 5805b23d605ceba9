"""Context parallelism for linear attention: DeltaNet, GLA and Gated DeltaNet over a sequence split across CP ranks.

Owns passing the recurrent state across the CP group so that a CP run computes what one rank computes on the
whole sequence, and the matching halo exchange for the short causal convolution that precedes the recurrence.
Rank ``i`` of ``N`` holds chunks ``i`` and ``2N - 1 - i`` of ``2N`` equal chunks (the load-balanced order of
:mod:`betterai_megatron.parallel.context_parallel`, shared with softmax ring attention in hybrid models).

Method: per-chunk summaries, a scan across ranks, then a correction (chosen over a sequential relay, which
would make rank ``j``'s chunk wait for every earlier chunk -- with the load-balanced order the relay visits
``2N - 1`` hops and the whole CP group runs one chunk at a time). All three recurrences are linear in the pair
(initial state ``S0``, values ``v``) for fixed ``q, k, g, beta``, with ``S0`` acting from the left:
``S_end = A S0 + B`` and ``o = o(0) + Qeff S0`` (per head; ``A [K, K]``, ``B, S [K, V]``, ``Qeff [L, K]``).

1. Each rank runs the ordinary chunked kernel (:mod:`betterai_megatron.kernels`, fla's kernels on GPU) once on
   each of its two chunks with an *augmented* value/state: ``v' = [v | 0_K]`` and ``S0' = [0 | I_K]``. The final
   state is then ``[B | A]`` and the output ``[o(0) | Qeff]`` -- every summary comes from the public kernel API
   in one call, at value width ``V + K`` (no second kernel pass, no kernel internals).
2. The ``[K, V + K]`` summaries of all ``2N`` chunks are all-gathered (size independent of sequence length)
   and every rank scans ``S_{c+1} = A_c S_c + B_c`` over the chunks in sequence order (``2N`` small matmuls).
3. Each local chunk's output is corrected: ``o = o(0) + Qeff S_c``.

Memory per token and value head beyond the single-rank kernel: ``K`` more value columns saved by the kernel
and the fp32 ``Qeff`` (``K`` values) saved for the correction (what ``model-info`` adds for CP); the summaries
and states have no token dimension.

Autograd flows through the kernels, the scan and the gather (whose backward sums every rank's gradient for a
chunk's summary and hands it to the chunk's owner: one all-reduce of the summaries' size). In exact arithmetic
this equals the single-rank recurrence; in fp32 it differs by rounding only (tests: 1e-5 relative).

Layout (fla 0.6, as the kernels): ``q, k [B, T, H, K]``, ``v [B, T, HV, V]``, ``g`` ``[B, T, HV]`` (gated delta
rule) or ``[B, T, H, K]`` (GLA), ``beta [B, T, HV]``; ``T`` = local tokens (two chunks of ``T / 2``). Returns
``o [B, T, HV, V]`` in the dtype of ``q``. No initial/final state (training and prefill from the sequence start).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from betterai_megatron.kernels.delta_rule import chunk_delta_rule
from betterai_megatron.kernels.gated_delta_rule import chunk_gated_delta_rule
from betterai_megatron.kernels.gla import chunk_gla


class _AllGatherStack(torch.autograd.Function):
    """``[...] -> [cp, ...]`` (every rank's tensor, rank order); backward sums the gradient over ranks (all-reduce,
    available on gloo and NCCL) and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _cp_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def chunk_owner(chunk: int, cp_size: int) -> tuple[int, int]:
    """``(rank, slot)`` holding chunk ``chunk`` of ``2 * cp_size`` (slot 0: the rank's first chunk, 1: its second)."""
    return (chunk, 0) if chunk < cp_size else (2 * cp_size - 1 - chunk, 1)


def _fold(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2L, ...] -> [2B, L, ...]``: the two local chunks become separate batch rows (first chunk first)."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, half:]], dim=0)


def _unfold(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_fold`."""
    batch = x.shape[0] // 2
    return torch.cat([x[:batch], x[batch:]], dim=1)


def scan_chunk_states(summaries: torch.Tensor, *, value_dim: int, cp_size: int) -> torch.Tensor:
    """States entering every chunk, from all ranks' summaries.

    ``summaries [cp, 2B, HV, K, V + K]`` (rank-major; rows ``[:B]`` first chunk, ``[B:]`` second; last dim
    ``[B_c | A_c]``) -> ``[2 cp, B, HV, K, V]`` fp32 states in sequence order (chunk 0 enters with zeros).
    """
    batch = summaries.shape[1] // 2
    state = summaries.new_zeros(*summaries.shape[2:-1], value_dim).unsqueeze(0).expand(batch, -1, -1, -1)
    entering = []
    for chunk in range(2 * cp_size):
        entering.append(state)
        rank, slot = chunk_owner(chunk, cp_size)
        inject, transition = summaries[rank, slot * batch : (slot + 1) * batch].split(
            [value_dim, summaries.shape[-1] - value_dim], dim=-1
        )
        state = transition @ state + inject
    return torch.stack(entering)


def cp_linear_recurrence(
    run: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    per_token: dict[str, torch.Tensor],
    v: torch.Tensor,
    *,
    key_dim: int,
    cp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The generic algorithm of the module docstring for any recurrence linear in ``(S0, v)``.

    ``run(**per_token_chunks, v=..., initial_state=...)`` must return ``(o, final_state)`` like fla's
    ``chunk_*`` calls with ``output_final_state=True``. ``per_token``: the other ``[B, T, ...]`` inputs
    (q, k, g, beta), ``v [B, T, HV, V]``. Returns ``o [B, T, HV, V]``.
    """
    cp_size = _cp_size(cp_group)
    if cp_size == 1:
        o, _ = run(**per_token, v=v, initial_state=None)
        return o
    batch, local_length, value_heads, value_dim = v.shape
    if local_length % 2:
        raise ValueError(f"context-parallel linear attention needs an even local length (2 chunks), got {local_length}")
    folded = {name: _fold(t) for name, t in per_token.items()}
    v_aug = _fold(v)
    v_aug = torch.cat([v_aug, v_aug.new_zeros(*v_aug.shape[:-1], key_dim)], dim=-1)
    eye = torch.eye(key_dim, dtype=torch.float32, device=v.device).expand(2 * batch, value_heads, key_dim, key_dim)
    initial = torch.cat([eye.new_zeros(2 * batch, value_heads, key_dim, value_dim), eye], dim=-1)
    o_aug, final = run(**folded, v=v_aug, initial_state=initial)
    o_zero, q_eff = o_aug.split([value_dim, key_dim], dim=-1)  # [2B, L, HV, V], [2B, L, HV, K]
    summaries = _AllGatherStack.apply(final.float(), cp_group)  # [cp, 2B, HV, K, V + K]
    states = scan_chunk_states(summaries, value_dim=value_dim, cp_size=cp_size)
    rank = dist.get_rank(cp_group)
    mine = torch.cat([states[rank], states[2 * cp_size - 1 - rank]])  # [2B, HV, K, V]
    # a compact fp32 copy: the einsum saves it for backward, and a view would keep all of o_aug alive instead
    q_eff = q_eff.float().contiguous()
    correction = torch.einsum("blhk,bhkv->blhv", q_eff, mine)
    return _unfold((o_zero.float() + correction).to(o_aug.dtype))


def cp_chunk_gated_delta_rule(q, k, v, g, beta, *, cp_group, scale=None, use_qk_l2norm_in_kernel=False,
                              **kernel_kwargs) -> torch.Tensor:  # fmt: skip
    """:func:`~betterai_megatron.kernels.chunk_gated_delta_rule` over a CP-split sequence; returns ``o``."""

    def run(q, k, g, beta, v, initial_state):
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                      output_final_state=initial_state is not None,
                                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kernel_kwargs)  # fmt: skip

    return cp_linear_recurrence(run, dict(q=q, k=k, g=g, beta=beta), v, key_dim=k.shape[-1], cp_group=cp_group)


def cp_chunk_delta_rule(q, k, v, beta, *, cp_group, scale=None, use_qk_l2norm_in_kernel=False,
                        **kernel_kwargs) -> torch.Tensor:  # fmt: skip
    """:func:`~betterai_megatron.kernels.chunk_delta_rule` over a CP-split sequence; returns ``o``."""

    def run(q, k, beta, v, initial_state):
        return chunk_delta_rule(q, k, v, beta, scale=scale, initial_state=initial_state,
                                output_final_state=initial_state is not None,
                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kernel_kwargs)  # fmt: skip

    return cp_linear_recurrence(run, dict(q=q, k=k, beta=beta), v, key_dim=k.shape[-1], cp_group=cp_group)


def cp_chunk_gla(q, k, v, g, *, cp_group, scale=None, **kernel_kwargs) -> torch.Tensor:
    """:func:`~betterai_megatron.kernels.chunk_gla` over a CP-split sequence; returns ``o``."""

    def run(q, k, g, v, initial_state):
        return chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                         output_final_state=initial_state is not None, **kernel_kwargs)  # fmt: skip

    return cp_linear_recurrence(run, dict(q=q, k=k, g=g), v, key_dim=k.shape[-1], cp_group=cp_group)


def cp_previous_tokens(x: torch.Tensor, *, count: int, cp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """The ``count`` tokens that precede each of this rank's two chunks in the full sequence (the halo of a short
    causal convolution of width ``count + 1``); zeros before the sequence start. Differentiable.

    ``x [B, C, T]`` (channels first, as :func:`~betterai_megatron.model.linear_attention.short_conv.
    causal_short_conv` takes it) -> ``[2, B, C, count]``: row 0 precedes the first local chunk, row 1 the second.
    Each chunk then convolves on its own with that halo as its state.
    """
    cp_size = _cp_size(cp_group)
    half = x.shape[-1] // 2
    if count > half:
        raise ValueError(f"convolution halo of {count} tokens exceeds the CP chunk length {half}")
    tails = torch.stack([x[..., half - count : half], x[..., 2 * half - count :]])  # [2, B, C, count]
    everything = _AllGatherStack.apply(tails, cp_group) if cp_size > 1 else tails.unsqueeze(0)
    rank = 0 if cp_size == 1 else dist.get_rank(cp_group)
    halos = []
    for chunk in (rank, 2 * cp_size - 1 - rank):
        if chunk == 0:
            halos.append(torch.zeros_like(tails[0]))
        else:
            owner, slot = chunk_owner(chunk - 1, cp_size)
            halos.append(everything[owner, slot])
    return torch.stack(halos)
