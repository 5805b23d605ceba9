"""The (gated) delta rule: chunked training kernel, recurrent generation step, fla-compatible entry points.

Papers
* Gated Delta Networks: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
  ICLR 2025 (arXiv:2412.06464). Recurrence, per head, state ``S`` of shape ``[K, V]``:
  ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,  ``o_t = scale * S_t^T q_t``.
* The chunked form follows Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
  Length" (NeurIPS 2024, arXiv:2406.06484): inside a chunk the product of Householder-like updates is written in
  WY/UT form, so every chunk is solved in parallel with one unit-lower-triangular solve; only a ``[K, V]`` state
  crosses chunk boundaries. The plain delta rule is the case ``g = 0`` (see :mod:`.delta_rule`).

Chunk algebra used here (chunk of ``C`` positions, ``gamma_i`` = cumulative sum of ``g`` inside the chunk, ``S``
the state entering the chunk; all decays are ``exp`` of non-positive numbers, so nothing overflows):
``u_i`` ("new values") satisfy ``(I + A) U = diag(beta) V - diag(beta e^gamma) K S`` with
``A_ij = beta_i e^(gamma_i - gamma_j) k_i.k_j`` for ``j < i``. With ``W = (I + A)^-1 diag(beta e^gamma) K`` and
``U' = (I + A)^-1 diag(beta) V`` (per chunk, independent of ``S``):
``O = (Q e^gamma - P W) S + P U'`` with ``P = (Q K^T) * e^(gamma_i - gamma_j) [j <= i]`` and
``S_next = e^gamma_C S + Kd^T (U' - W S)`` with ``Kd = K e^(gamma_C - gamma)``.
Everything except the ``S_next`` recurrence (two ``[C, K] x [K, V]``-sized products per chunk) runs for all
chunks at once; autograd flows through plain torch ops.

Layout and semantics are fla 0.6's ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule``:
``q, k [B, T, H, K]``, ``v [B, T, HV, V]`` (grouped value heads when ``HV > H``, value head ``j`` reads key head
``j // (HV // H)``), ``g, beta [B, T, HV]`` with ``g`` a log-space decay, ``scale`` default ``1/sqrt(K)``,
``initial_state`` / final state ``[N, HV, K, V]`` in fp32, output in the dtype of ``q``. On CUDA with fla
installed the calls go to fla's Triton kernels (see :mod:`._fla_compat`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from betterai_megatron.kernels import _fla_compat as compat

KERNEL_CHUNK = "chunk_gated_delta_rule"
KERNEL_RECURRENT = "fused_recurrent_gated_delta_rule"


def _expand_groups(x: torch.Tensor, num_value_heads: int) -> torch.Tensor:
    """``[B, T, H, D] -> [B, T, HV, D]``: value head ``j`` uses key head ``j // (HV // H)`` (fla's GVA)."""
    heads = x.shape[2]
    if heads == num_value_heads:
        return x
    if num_value_heads % heads:
        raise ValueError(f"num value heads ({num_value_heads}) must be a multiple of num key heads ({heads})")
    return x.repeat_interleave(num_value_heads // heads, dim=2)


def unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """``(I + A)^-1`` for strictly lower-triangular ``A [..., C, C]``, by recursive 2x2 block inversion.

    ``[[T11, 0], [L21, T22]]^-1 = [[T11^-1, 0], [-T22^-1 L21 T11^-1, T22^-1]]``, doubling the block size from 1
    (where the inverse is 1) to ``C``: log2(C) rounds of batched matmuls. Batched ``linalg.solve_triangular``
    is ~50x slower than matmul of the same size on CPU (one LAPACK call per small matrix), and this form is as
    stable as forward substitution (no matrix powers).
    """
    size = strict_lower.shape[-1]
    padded = 1 << max(size - 1, 0).bit_length()
    if padded != size:  # block-diagonal padding with the identity keeps the leading block's inverse exact
        strict_lower = F.pad(strict_lower, (0, padded - size, 0, padded - size))
    lead = strict_lower.shape[:-2]
    blocks = torch.ones(*lead, padded, 1, 1, dtype=strict_lower.dtype, device=strict_lower.device)
    block = 1
    while block < padded:
        pairs = padded // (2 * block)
        grouped = strict_lower.reshape(*lead, pairs, 2 * block, pairs, 2 * block)
        diagonal = torch.diagonal(grouped, dim1=-4, dim2=-2).movedim(-1, -3)  # [.., pairs, 2b, 2b]
        lower_left = diagonal[..., block:, :block]
        paired = blocks.reshape(*lead, pairs, 2, block, block)
        upper_inv, lower_inv = paired[..., 0, :, :], paired[..., 1, :, :]
        off = -(lower_inv @ lower_left @ upper_inv)
        top = torch.cat([upper_inv, torch.zeros_like(upper_inv)], dim=-1)
        bottom = torch.cat([off, lower_inv], dim=-1)
        blocks = torch.cat([top, bottom], dim=-2)
        block *= 2
    return blocks.reshape(*lead, padded, padded)[..., :size, :size]


def _chunk_torch(q, k, v, g, beta, *, scale, initial_state, output_final_state, chunk_size):
    """Chunked (gated) delta rule for equal-length batches; ``g`` may be ``None`` (plain delta rule).

    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g, beta: ``[B, T, H]``; initial_state ``[B, H, K, V]``.
    Returns ``o [B, T, H, V]`` (compute dtype) and the final state ``[B, H, K, V]`` or ``None``.
    """
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    dtype = compat.compute_dtype(q.dtype)
    pad = (-length) % chunk_size
    # zero keys and beta leave the state untouched and g = 0 does not decay it: padding is exact
    chunks = (length + pad) // chunk_size

    def to_chunks(x):  # [B, T, H, *] -> [B, H, N, C, *], zero-padded along T
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.transpose(1, 2).reshape(batch, heads, chunks, chunk_size, *x.shape[3:])

    q, k, v, beta = to_chunks(q) * scale, to_chunks(k), to_chunks(v), to_chunks(beta)
    positions = torch.arange(chunk_size, device=q.device)
    causal = positions[:, None] >= positions[None, :]  # [C, C], j <= i
    if g is None:
        gamma = None
        decay = causal.to(dtype)
    else:
        g_chunks = to_chunks(g)  # [B, H, N, C]
        gamma = g_chunks.cumsum(-1)
        # gamma_i - gamma_j summed directly over (j, i] (masked cumsum), not as a difference of two cumulative
        # sums, which cancels in fp32 when a chunk decays strongly
        strictly_after = positions[None, :] > positions[:, None]  # [j, i]: i > j
        segment = (g_chunks[..., None, :] * strictly_after).cumsum(-1).transpose(-1, -2)  # [B, H, N, C(i), C(j)]
        decay = segment.masked_fill(~causal, float("-inf")).exp()
    strict_decay = decay.masked_fill(torch.eye(chunk_size, dtype=torch.bool, device=q.device), 0.0)

    lower = beta[..., :, None] * (k @ k.transpose(-1, -2)) * strict_decay
    k_beta = k * beta[..., None]
    if gamma is not None:
        k_beta = k_beta * gamma.exp()[..., None]
    rhs = torch.cat([k_beta, v * beta[..., None]], dim=-1)
    solved = unit_lower_inverse(lower) @ rhs
    w, u = solved.split([key_dim, value_dim], dim=-1)  # W [.., C, K], U' [.., C, V]

    scores = (q @ k.transpose(-1, -2)) * decay  # P
    q_decayed = q * gamma.exp()[..., None] if gamma is not None else q
    q_hat = q_decayed - scores @ w  # [B, H, N, C, K]
    o_local = scores @ u  # [B, H, N, C, V]
    if gamma is not None:
        to_end = F.pad(g_chunks.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # sum of g over (j, C]
        k_decayed_t = (k * to_end.exp()[..., None]).transpose(-1, -2)  # [B, H, N, K, C]
        chunk_decay = gamma[..., -1:, None].exp()  # [B, H, N, 1, 1]
    else:
        k_decayed_t = k.transpose(-1, -2)
        chunk_decay = None

    state = (
        initial_state.to(dtype)
        if initial_state is not None
        else q.new_zeros(batch, heads, key_dim, value_dim)
    )
    entering = []
    for index in range(chunks):  # the only sequential part: two [C, K] x [K, V]-sized products per chunk
        entering.append(state)
        new_values = u[:, :, index] - w[:, :, index] @ state  # U = U' - W S
        if chunk_decay is not None:
            state = chunk_decay[:, :, index] * state
        state = state + k_decayed_t[:, :, index] @ new_values
    o = q_hat @ torch.stack(entering, dim=2) + o_local  # [B, H, N, C, V]
    o = o.reshape(batch, heads, chunks * chunk_size, value_dim)[:, :, :length].transpose(1, 2)
    return o, (state if output_final_state else None)


def _recurrent_torch(q, k, v, g, beta, *, scale, initial_state, output_final_state):
    """Token-by-token (gated) delta rule, the generation step; shapes as :func:`_chunk_torch`."""
    batch, length, heads, key_dim = k.shape
    dtype = compat.compute_dtype(q.dtype)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    state = (
        initial_state.to(dtype)
        if initial_state is not None
        else q.new_zeros(batch, heads, key_dim, v.shape[-1])
    )
    outputs = []
    for t in range(length):
        if g is not None:
            state = state * g[:, t].to(dtype).exp()[..., None, None]
        k_t = k[:, t]
        prediction = (state * k_t[..., None]).sum(-2)  # S^T k, [B, H, V]
        update = beta[:, t, :, None] * (v[:, t] - prediction)
        state = state + k_t[..., None] * update[..., None, :]
        outputs.append((state * (q[:, t] * scale)[..., None]).sum(-2))
    return torch.stack(outputs, dim=1), (state if output_final_state else None)


def prepare_gate_and_beta(g, beta, *, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                          allow_neg_eigval):
    """fla's in-kernel gate/beta activations, done in torch: returns log-decay ``g`` and ``beta``.

    ``use_gate_in_kernel``: ``g = -exp(A_log) * softplus(g + dt_bias)`` (Mamba2-style discretisation, fp32).
    ``use_beta_sigmoid_in_kernel``: ``beta = sigmoid(beta)``, times 2 when ``allow_neg_eigval``.
    """
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True")
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("A_log must be provided when use_gate_in_kernel=True")
        raw = g.float() + (dt_bias.float() if dt_bias is not None else 0.0)
        g = -A_log.float().exp() * F.softplus(raw)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    return g, beta


def _torch_entry(kernel, q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                 state_v_first, cu_seqlens, **kernel_kwargs):
    """Shared torch path of the chunked and recurrent entry points: l2norm, GVA, state layout, varlen."""
    out_dtype = q.dtype
    if use_qk_l2norm_in_kernel:
        q, k = compat.l2norm(q.to(compat.compute_dtype(q.dtype))), compat.l2norm(k.to(compat.compute_dtype(k.dtype)))
    q, k = _expand_groups(q, v.shape[2]), _expand_groups(k, v.shape[2])
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    run = dict(scale=scale, **kernel_kwargs)
    if cu_seqlens is None:
        o, final = kernel(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                          **run)
    else:
        o, final = compat.run_varlen(
            lambda q, k, v, g, beta, **kw: kernel(q, k, v, g, beta, **kw),
            dict(q=q, k=k, v=v, g=g, beta=beta),
            cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state, **run,
        )
    if final is not None:
        final = final.float() if final.dtype != torch.float64 else final
        if state_v_first:
            final = final.transpose(-1, -2)
    return o.to(out_dtype), final


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    *,
    chunk_size: int = 64,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla 0.6 ``chunk_gated_delta_rule``: ``o [B, T, HV, V]`` and the final state ``[N, HV, K, V]`` (or None).

    q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g (log decay), beta ``[B, T, HV]``. Extra keywords of fla that
    are honoured: ``use_gate_in_kernel``, ``A_log``, ``dt_bias``. ``backend``: ``auto|torch|fla``.
    """
    compat.check_no_extra_kwargs(KERNEL_CHUNK, kwargs, ("use_gate_in_kernel", "A_log", "dt_bias"))
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}")
    if v.shape[2] % q.shape[2]:
        raise ValueError(f"num value heads ({v.shape[2]}) must be a multiple of num key heads ({q.shape[2]})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    compat.check_varlen(KERNEL_CHUNK, q, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if compat.select_backend(KERNEL_CHUNK, q, backend) == "fla":
        return compat.fla_ops().chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first, cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu, chunk_indices=chunk_indices, chunk_size=chunk_size, **kwargs,
        )
    g, beta = prepare_gate_and_beta(
        g, beta, use_gate_in_kernel=kwargs.get("use_gate_in_kernel", False), A_log=kwargs.get("A_log"),
        dt_bias=kwargs.get("dt_bias"), use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
    )
    return _torch_entry(
        _chunk_torch, q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        state_v_first=state_v_first, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    *,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla 0.6 ``fused_recurrent_gated_delta_rule``: the token-by-token form, used for generation steps.

    Same shapes as :func:`chunk_gated_delta_rule`; ``beta`` defaults to ones. Per-key/value gates (``gk``,
    ``gv``) are fla-only.
    """
    compat.check_no_extra_kwargs(KERNEL_RECURRENT, kwargs)
    compat.check_varlen(KERNEL_RECURRENT, q, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if compat.select_backend(KERNEL_RECURRENT, q, backend) == "fla":
        return compat.fla_ops().fused_recurrent_gated_delta_rule(
            q, k, v, g=g, gk=gk, gv=gv, beta=beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
            state_v_first=state_v_first, cu_seqlens=cu_seqlens,
        )
    if gk is not None or gv is not None:
        raise NotImplementedError(f"{KERNEL_RECURRENT}: gk/gv gates are only available with the fla backend")
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=v.dtype, device=v.device)
    g, beta = prepare_gate_and_beta(
        g, beta, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
    )
    return _torch_entry(
        _recurrent_torch, q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        state_v_first=state_v_first, cu_seqlens=cu_seqlens,
    )
