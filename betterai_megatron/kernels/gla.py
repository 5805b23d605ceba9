"""Gated linear attention (GLA): chunked training kernel, recurrent generation step, fla-compatible entry points.

Paper: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient Training",
ICML 2024 (arXiv:2312.06635). Per head, state ``S [K, V]`` and a data-dependent per-key decay ``g_t [K]`` (log
space): ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,  ``o_t = scale * S_t^T q_t``.

Chunked form (the paper's section 4): with ``G_i`` the cumulative sum of ``g`` inside a chunk,
``o_i = (q_i e^{G_i}) S + sum_{j<=i} (sum_d q_id k_jd e^{G_id - G_jd}) v_j``. The intra-chunk scores are one
matmul ``(q e^G)(k e^-G)^T`` while the decay inside the chunk is moderate (checked; the usual case); when it is
large that product would overflow, so, as in the paper's "secondary chunking", the chunk is cut into sub-chunks
of 16 with a reference point per sub-chunk, and, if even a sub-chunk decays too much, the diagonal sub-chunk
blocks are computed exactly from a ``[16, 16, K]`` decay tensor. Across chunks only the ``[K, V]`` state is
carried (an elementwise recurrence).

Layout and semantics are fla 0.6's ``chunk_gla`` / ``fused_recurrent_gla``: ``q, k, g [B, T, H, K]``,
``v [B, T, H, V]``, ``scale`` default ``1/sqrt(K)``, states ``[N, H, K, V]`` in fp32 (``[N, H, V, K]`` with
``state_v_first``), output in the dtype of ``q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from betterai_megatron.kernels import _fla_compat as compat

KERNEL_CHUNK = "chunk_gla"
KERNEL_RECURRENT = "fused_recurrent_gla"
SUB_CHUNK = 16


def _reference_scores(q, k, cum_g, sub: int, *, own_block: bool):
    """Scores ``sum_d q_id k_jd e^(G_id - G_jd)`` through one matmul per sub-chunk of queries.

    For queries in sub-chunk ``a`` the decay is split at the reference ``r_a`` (``G`` just before the
    sub-chunk): ``q_i e^(G_i - r_a)`` has exponents <= 0, ``k_j e^(r_a - G_j)`` has exponents <= 0 for keys before
    the sub-chunk and at most the sub-chunk's own total decay inside it (the caller checks that bound). Keys after
    the sub-chunk (and, when ``own_block`` is False, inside it) are masked out before ``exp``. Returns
    ``[.., C, C]`` (not yet causally masked inside the diagonal blocks).
    """
    *lead, chunk, key_dim = q.shape
    parts = chunk // sub
    qs, gs = q.reshape(*lead, parts, sub, key_dim), cum_g.reshape(*lead, parts, sub, key_dim)
    refs = torch.cat([torch.zeros_like(gs[..., :1, -1, :]), gs[..., :-1, -1, :]], dim=-2)  # [.., P, K]
    q_ref = qs * (gs - refs[..., None, :]).exp()
    key_pos = torch.arange(chunk, device=q.device)
    limits = (torch.arange(parts, device=q.device) + (1 if own_block else 0)) * sub
    masked = (key_pos[None, :] >= limits[:, None])[..., None]  # [P, C, 1]
    k_ref = k[..., None, :, :] * (refs[..., None, :] - cum_g[..., None, :, :]).masked_fill(masked, float("-inf")).exp()
    return (q_ref @ k_ref.transpose(-1, -2)).reshape(*lead, chunk, chunk)


def _diagonal_block_scores(q, k, g, sub: int):
    """Exact scores inside each sub-chunk, placed block-diagonally; ``g`` is the raw (not cumulative) decay.

    The exponent ``G_i - G_j`` is summed directly as ``sum_{j < m <= i} g_m`` (a masked cumsum over a
    ``[sub, sub, K]`` tensor) instead of as a difference of two long cumulative sums, which loses precision in
    fp32 exactly in this strong-decay regime.
    """
    *lead, chunk, key_dim = q.shape
    parts = chunk // sub
    qs, ks, gs = (x.reshape(*lead, parts, sub, key_dim) for x in (q, k, g))
    positions = torch.arange(sub, device=q.device)
    after = (positions[:, None] > positions[None, :])[..., None]  # [sub(i), sub(j), 1]: m > j
    exponent = (gs[..., :, None, :] * after).cumsum(dim=-3)  # [.., P, i, j, K] = sum_{j < m <= i} g_m
    decay = exponent.masked_fill(~(after | torch.eye(sub, dtype=torch.bool, device=q.device)[..., None]),
                                 float("-inf")).exp()
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * decay).sum(-1)  # [.., P, sub, sub]
    eye_parts = torch.eye(parts, dtype=q.dtype, device=q.device)
    return (diag[..., :, :, None, :] * eye_parts[:, None, :, None]).reshape(*lead, chunk, chunk)


def _largest_window_decay(cum_g, sub: int) -> float:
    """The largest total decay ``-(sum of g)`` over any sub-chunk of ``sub`` positions (a host sync)."""
    *lead, chunk, key_dim = cum_g.shape
    gs = cum_g.reshape(*lead, chunk // sub, sub, key_dim)
    before = torch.cat([torch.zeros_like(gs[..., :1, -1, :]), gs[..., :-1, -1, :]], dim=-2)
    return float((before - gs[..., -1, :]).max().detach()) if cum_g.numel() else 0.0


def _intra_chunk_scores(q, k, g, cum_g):
    """Decayed causal scores inside each chunk, ``[B, H, N, C, C]``; q, k, g, cum_g ``[B, H, N, C, K]``.

    Fast path: one reference per chunk, or per sub-chunk of 16, when the decay inside that window stays below
    ``e^40`` (fp32; far beyond GLA's gates, whose per-step log decay is ``logsigmoid(x)/16``). Otherwise the
    paper's secondary chunking: references between sub-chunks, exact ``[16, 16, K]`` blocks on the diagonal.
    """
    chunk = q.shape[-2]
    limit = 600.0 if q.dtype == torch.float64 else 40.0
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    sub = SUB_CHUNK if chunk % SUB_CHUNK == 0 else chunk
    for window in dict.fromkeys((chunk, sub)):
        if _largest_window_decay(cum_g, window) <= limit:
            return _reference_scores(q, k, cum_g, window, own_block=True) * causal
    off_diagonal = _reference_scores(q, k, cum_g, sub, own_block=False) if sub < chunk else 0.0
    return off_diagonal + _diagonal_block_scores(q, k, g, sub)


def _chunk_torch(q, k, v, g, *, scale, initial_state, output_final_state, chunk_size):
    """Chunked GLA for equal-length batches. q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; state ``[B, H, K, V]``."""
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    dtype = compat.compute_dtype(q.dtype)
    pad = (-length) % chunk_size
    # zero q/k/v and g = 0 (no decay) in the padding leave outputs and the final state unchanged
    chunks = (length + pad) // chunk_size

    def to_chunks(x):  # [B, T, H, D] -> [B, H, N, C, D], zero-padded along T
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.transpose(1, 2).reshape(batch, heads, chunks, chunk_size, x.shape[-1])

    q, k, v, g = to_chunks(q) * scale, to_chunks(k), to_chunks(v), to_chunks(g)
    cum_g = g.cumsum(-2)  # [B, H, N, C, K]
    o_local = _intra_chunk_scores(q, k, g, cum_g) @ v  # [B, H, N, C, V]

    last = cum_g[..., -1:, :]  # [B, H, N, 1, K]
    # decay from each position to the chunk end, summed directly (a reversed cumsum, shifted by one) rather
    # than as last - cum_g, which cancels in fp32 when the chunk decays strongly
    to_end = F.pad(g.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))
    injection = (k * to_end.exp()).transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = last.exp().transpose(-1, -2)  # [B, H, N, K, 1]
    state = (
        initial_state.to(dtype)
        if initial_state is not None
        else q.new_zeros(batch, heads, key_dim, value_dim)
    )
    entering = []
    for index in range(chunks):  # sequential part: an elementwise decay plus an add per chunk
        entering.append(state)
        state = chunk_decay[:, :, index] * state + injection[:, :, index]
    o = (q * cum_g.exp()) @ torch.stack(entering, dim=2) + o_local
    o = o.reshape(batch, heads, chunks * chunk_size, value_dim)[:, :, :length].transpose(1, 2)
    return o, (state if output_final_state else None)


def _recurrent_torch(q, k, v, g, *, scale, initial_state, output_final_state):
    """Token-by-token GLA (the generation step); shapes as :func:`_chunk_torch`."""
    batch, length, heads, key_dim = k.shape
    dtype = compat.compute_dtype(q.dtype)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    state = (
        initial_state.to(dtype)
        if initial_state is not None
        else q.new_zeros(batch, heads, key_dim, v.shape[-1])
    )
    outputs = []
    for t in range(length):
        state = state * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append((state * (q[:, t] * scale)[..., None]).sum(-2))
    return torch.stack(outputs, dim=1), (state if output_final_state else None)


def _torch_entry(kernel, q, k, v, g, *, initial_state, output_final_state, state_v_first, cu_seqlens, **kw):
    """Shared torch path: state layout, varlen, output dtypes."""
    out_dtype = q.dtype
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    if cu_seqlens is None:
        o, final = kernel(q, k, v, g, initial_state=initial_state, output_final_state=output_final_state, **kw)
    else:
        o, final = compat.run_varlen(
            lambda q, k, v, g, **rest: kernel(q, k, v, g, **rest), dict(q=q, k=k, v=v, g=g),
            cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state, **kw,
        )
    if final is not None:
        final = final.float() if final.dtype != torch.float64 else final
        if state_v_first:
            final = final.transpose(-1, -2)
    return o.to(out_dtype), final


def _check_shapes(name, q, k, v, g) -> None:
    if not (q.shape == k.shape == g.shape):
        raise ValueError(f"{name}: q, k, g must have the same shape [B, T, H, K], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: v must be [B, T, H, V] matching q {tuple(q.shape)}, got {tuple(v.shape)}")


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    *,
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla 0.6 ``chunk_gla``: ``o [B, T, H, V]`` and the final state ``[N, H, K, V]`` (or None).

    ``chunk_size`` applies to the torch path (fla's GLA kernel fixes its own). ``backend``: ``auto|torch|fla``.
    """
    _check_shapes(KERNEL_CHUNK, q, k, v, g)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    compat.check_varlen(KERNEL_CHUNK, q, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if compat.select_backend(KERNEL_CHUNK, q, backend) == "fla":
        if initial_state is not None:
            initial_state = initial_state.float()  # fla: "initial_state must be in float32"
        return compat.fla_ops().chunk_gla(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            state_v_first=state_v_first, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
        )
    return _torch_entry(
        _chunk_torch, q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        state_v_first=state_v_first, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla 0.6 ``fused_recurrent_gla``: token-by-token form for generation; ``gk [B, T, H, K]`` is the log decay
    (no decay when None). ``gv`` and ``reverse`` are fla-only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compat.check_varlen(KERNEL_RECURRENT, q, initial_state, cu_seqlens)
    if compat.select_backend(KERNEL_RECURRENT, q, backend) == "fla":
        return compat.fla_ops().fused_recurrent_gla(
            q, k, v, gk=gk, gv=gv, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            reverse=reverse, state_v_first=state_v_first, cu_seqlens=cu_seqlens,
        )
    if gv is not None or reverse:
        raise NotImplementedError(f"{KERNEL_RECURRENT}: gv and reverse are only available with the fla backend")
    gk = torch.zeros_like(q) if gk is None else gk
    _check_shapes(KERNEL_RECURRENT, q, k, v, gk)
    return _torch_entry(
        _recurrent_torch, q, k, v, gk, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens,
    )
