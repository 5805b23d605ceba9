"""The delta rule (DeltaNet): fla-compatible chunked and recurrent entry points.

Paper: Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
NeurIPS 2024 (arXiv:2406.06484); the delta rule itself is Schlag, Irie, Schmidhuber 2021 ("Linear Transformers
Are Secretly Fast Weight Programmers"). Per head, state ``S [K, V]``:
``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,  ``o_t = scale * S_t^T q_t``.

This is the gated delta rule with no decay, so the chunked (WY/UT) torch kernel is shared with
:mod:`.gated_delta_rule` (called with ``g = None``, which skips every decay term rather than computing
``exp(0)``). Layout and semantics are fla 0.6's ``chunk_delta_rule`` / ``fused_recurrent_delta_rule``:
``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta [B, T, H]``, ``scale`` default ``1/sqrt(K)``, states
``[N, H, K, V]`` in fp32. As in fla, keys are expected L2-normalised (or pass ``use_qk_l2norm_in_kernel=True``);
unnormalised keys make the recurrence unstable, which is a property of the model, not of the kernel.
"""

from __future__ import annotations

import torch

from betterai_megatron.kernels import _fla_compat as compat
from betterai_megatron.kernels.gated_delta_rule import _chunk_torch, _recurrent_torch, _torch_entry

KERNEL_CHUNK = "chunk_delta_rule"
KERNEL_RECURRENT = "fused_recurrent_delta_rule"


def _check_shapes(name: str, q, k, v, beta) -> None:
    if q.shape != k.shape:
        raise ValueError(f"{name}: q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3] or (beta is not None and beta.shape != q.shape[:3]):
        raise ValueError(
            f"{name}: expected v [B, T, H, V] and beta [B, T, H] matching q {tuple(q.shape)}, got "
            f"v {tuple(v.shape)}, beta {None if beta is None else tuple(beta.shape)}"
        )


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    *,
    chunk_size: int = 64,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla 0.6 ``chunk_delta_rule``: ``o [B, T, H, V]`` and the final state ``[N, H, K, V]`` (or None).

    ``backend``: ``auto|torch|fla``. fla's Triton kernel refuses fp32 inputs, so ``auto`` uses the torch path for them.
    """
    compat.check_no_extra_kwargs(KERNEL_CHUNK, kwargs)
    _check_shapes(KERNEL_CHUNK, q, k, v, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    compat.check_varlen(KERNEL_CHUNK, q, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if q.dtype == torch.float32 and backend in (None, "auto"):
        backend = "torch"  # fla: "ChunkDeltaRuleFunction does not support float32"
    if compat.select_backend(KERNEL_CHUNK, q, backend) == "fla":
        return compat.fla_ops().chunk_delta_rule(
            q, k, v, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
            chunk_size=chunk_size,
        )
    return _torch_entry(
        _chunk_torch, q, k, v, None, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        state_v_first=False, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla 0.6 ``fused_recurrent_delta_rule``: token-by-token form for generation; ``beta`` defaults to ones."""
    _check_shapes(KERNEL_RECURRENT, q, k, v, beta)
    compat.check_varlen(KERNEL_RECURRENT, q, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if compat.select_backend(KERNEL_RECURRENT, q, backend) == "fla":
        return compat.fla_ops().fused_recurrent_delta_rule(
            q, k, v, beta=beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
        )
    if beta is None:
        beta = torch.ones(q.shape[:3], dtype=q.dtype, device=q.device)
    return _torch_entry(
        _recurrent_torch, q, k, v, None, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        state_v_first=False, cu_seqlens=cu_seqlens,
    )
