"""Ring attention: exact softmax attention over a sequence split across a context-parallel (CP) group.

Owns the math and the communication schedule of context parallelism for softmax attention on any backend
(gloo, NCCL), without Transformer Engine. Ring attention: Liu et al., "Ring Attention with Blockwise
Transformers for Near-Infinite Context" (2023); the block merge is the online softmax of Milakov & Gimelshein
(2018) as used by FlashAttention (Dao et al., 2022).

Layout (megatron's core attention): ``query [s, b, np, hn]``, ``key``/``value [s, b, ng, hn]`` with
``np % ng == 0`` (GQA: query head ``h`` reads key/value group ``h // (np // ng)``, as megatron's
``repeat_interleave`` does), ``s`` the *local* tokens of this CP rank in the load-balanced chunk order of
:mod:`betterai_megatron.parallel.context_parallel` (rank ``i`` holds chunks ``i`` and ``2 cp - 1 - i``).
Returns ``[s, b, np, hn]`` in the input dtype.

Forward, on rank ``i`` of ``cp`` ranks, step ``t = 0 .. cp-1``: the packed K/V block of rank ``j = i - t``
(mod ``cp``) is here; the exchange that brings block ``j - 1`` (``isend`` to ``i + 1``, ``irecv`` from ``i - 1``,
``batch_isend_irecv``) is started *before* the block is computed, so it runs behind the compute. Each block
yields a partial output and its log-sum-exp (LSE); partials are merged in fp32 with
``lse = logaddexp(lse, lse_blk)``, ``out = out * exp(lse_old - lse) + out_blk * exp(lse_blk - lse)``.
Only the ``ng`` K/V heads travel; repeated heads are never materialised (the fused kernel and the grouped
matmuls below both read ``ng`` heads directly).

Causal masking with the load-balanced order needs no mask tensor (:func:`block_plan`): with ``j == i`` the
local block is plainly causal; with ``j < i`` every local query sees the first half of block ``j`` (chunk ``j``)
and nothing of its second half; with ``j > i`` only the second half of the local queries (chunk ``2cp-1-i``)
sees block ``j``, all of it. Every step costs the same ``2L x L`` scores on every rank (``L = s / 2``).

Backward runs the same ring: K/V blocks travel again, and the fp32 gradient ``(dK, dV)`` of each block travels
with it, each rank adding its contribution before passing it on; after ``cp`` steps one last hop returns every
block's complete gradient to its owner. Block gradients use the *final* output and LSE saved by the forward
(``dS = P * (dP - rowsum(dO * O))`` with ``P = exp(S - lse)``), so nothing but ``q, k, v, out, lse`` is saved.

Block kernels (hand-written orchestration; the per-block math comes from torch where it can):

* ``fused`` -- torch's own flash-attention CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu``
  (and its backward), which returns the LSE we need and never materialises the ``[sq, sk]`` score matrix. The
  forward reads GQA natively; the backward gets the visiting block expanded to the query heads (a transient,
  local copy -- that kernel's grouped-head backward is ~10x slower). Used on CPU when no explicit mask is given.
* ``torch`` -- plain grouped matmuls in fp32 softmax (any device, explicit masks; materialises one block's
  scores, which megatron's own local ``DotProductAttention`` does for the whole sequence). On CUDA this is what
  runs today; a fused CUDA block kernel is future work (Transformer Engine's CP is the fast GPU path).

Explicit masks (``True`` = masked, megatron's convention) are applied with megatron's fill value ``-10000``
(``attention_mask_func``), so rows with at least one visible key match ``DotProductAttention`` exactly.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from betterai_megatron.parallel.context_parallel import local_token_positions

MASKED_SCORE = -10000.0  # megatron.core.transformer.utils.attention_mask_func's fill value
BACKENDS = ("auto", "fused", "torch")
_KV_TAG, _DKV_TAG = 7101, 7102  # distinct gloo tags for the two streams of messages in the backward
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class RingCommStats:
    """Optional instrumentation (benchmarks), summed over forward and backward calls: seconds computing blocks,
    seconds blocked waiting on the ring, and per exchange (in call order, the same order on every rank) the
    ``time.perf_counter()`` at which it was posted and the ``(start, end)`` of the wait for it. On one host
    ``perf_counter`` is CLOCK_MONOTONIC, so ranks' timestamps compare: a wait that began before a neighbour had
    even posted is that neighbour running late, not communication (see ``benchmarks/context_parallel.py``).
    Host-side times: meaningful on CPU (gloo); on CUDA they measure kernel launches, not execution."""

    compute_s: float = 0.0
    blocked_s: float = 0.0
    bytes_sent: int = 0
    post_times: list = dataclasses.field(default_factory=list)
    wait_spans: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Which local query rows attend to which rows of the visiting K/V block, and whether causally."""

    q_rows: slice
    kv_rows: slice
    causal: bool


def block_plan(*, cp_rank: int, cp_size: int, step: int, local_seq_length: int, causal: bool) -> BlockPlan:
    """The block computed at ring ``step`` on ``cp_rank`` (K/V from rank ``(cp_rank - step) % cp_size``).

    Pure function of the load-balanced layout; see the module docstring for the three causal cases.
    """
    everything = slice(0, local_seq_length)
    if not causal:
        return BlockPlan(everything, everything, False)
    source = (cp_rank - step) % cp_size
    if source == cp_rank:
        return BlockPlan(everything, everything, True)
    half = local_seq_length // 2
    if source < cp_rank:
        return BlockPlan(everything, slice(0, half), False)
    return BlockPlan(slice(half, local_seq_length), everything, False)


class _Ring:
    """Point-to-point exchange with the ring neighbours of one CP group (global ranks for NCCL's sake)."""

    def __init__(self, group: dist.ProcessGroup | None, stats: RingCommStats | None):
        self.stats = stats
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            self.group, self.size, self.rank = None, 1, 0
            return
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next_peer = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev_peer = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> tuple[int, list]:
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous one."""
        index = -1
        if self.stats is not None:
            self.stats.bytes_sent += send.numel() * send.element_size()
            index = len(self.stats.post_times)
            self.stats.post_times.append(time.perf_counter())
        ops = [
            dist.P2POp(dist.isend, send, self.next_peer, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev_peer, self.group, tag),
        ]
        return index, dist.batch_isend_irecv(ops)

    def wait(self, handle: tuple[int, list]) -> None:
        start = time.perf_counter()
        for work in handle[1]:
            work.wait()
        if self.stats is not None:
            end = time.perf_counter()
            self.stats.blocked_s += end - start
            self.stats.wait_spans.append((handle[0], start, end))


# ---------------------------------------------------------------------------------------------------------
# Block kernels. Layout inside: q/out/dout [b, np, sq, hn], k/v [b, ng, sk, hn] (strided views), lse [b, np, sq]
# fp32, mask bool [B, 1 | np, sq, sk] (True = masked) or None. Outputs: fp32 partial out and lse / grads.
# ---------------------------------------------------------------------------------------------------------


def _grouped_scores(q, k, *, scale, causal, mask):
    """fp32 scores ``[b, ng, r, sq, sk]`` (``r = np / ng``) with masked entries set to ``MASKED_SCORE``."""
    b, num_heads, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    r = num_heads // ng
    scores = torch.matmul(q.reshape(b, ng, r * sq, hn), k.transpose(-1, -2)).float()
    scores = scores.view(b, ng, r, sq, sk).mul_(scale)
    if causal:
        future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(future, MASKED_SCORE)
    if mask is not None:
        grouped = mask.view(mask.shape[0], ng, r, sq, sk) if mask.shape[1] == num_heads else mask.unsqueeze(1)
        scores.masked_fill_(grouped, MASKED_SCORE)
    return scores


def _torch_block_forward(q, k, v, *, scale, causal, mask):
    b, num_heads, sq, hn = q.shape
    ng = k.shape[1]
    scores = _grouped_scores(q, k, scale=scale, causal=causal, mask=mask)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).view(b, ng, -1, k.shape[2])
    out = torch.matmul(probs.to(v.dtype), v).float()  # [b, ng, r*sq, hn]
    return out.view(b, num_heads, sq, hn), lse.view(b, num_heads, sq)


def _torch_block_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    b, num_heads, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    scores = _grouped_scores(q, k, scale=scale, causal=causal, mask=mask)
    probs = torch.exp(scores - lse.view(b, ng, -1, sq, 1)).view(b, ng, -1, sk)  # [b, ng, r*sq, sk]
    dout_g = dout.reshape(b, ng, -1, hn)
    dv = torch.matmul(probs.transpose(-1, -2).to(dout.dtype), dout_g).float()
    dprobs = torch.matmul(dout_g, v.transpose(-1, -2)).float()
    delta = (dout.float() * out.float()).sum(-1).view(b, ng, -1, 1)  # rowsum(dO * O), final O
    dscores = probs.mul_(dprobs.sub_(delta))
    dq = torch.matmul(dscores.to(q.dtype), k).float().mul_(scale).view(b, num_heads, sq, hn)
    dk = torch.matmul(dscores.transpose(-1, -2).to(q.dtype), q.reshape(b, ng, -1, hn)).float().mul_(scale)
    return dq, dk, dv


def _fused_block_forward(q, k, v, *, scale, causal, mask):
    assert mask is None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out.float(), lse.float()


def _fused_block_backward(dout, q, k, v, out, lse, *, scale, causal, mask):
    assert mask is None
    # torch's CPU flash backward is ~10x slower with grouped K/V heads and ~2x slower on strided inputs
    # (measured, torch 2.13): give it contiguous [b, h, s, d] tensors and this block's K/V expanded to the query
    # heads -- a transient local copy; only the ng heads travel the ring -- and sum dK/dV back over each group.
    b, num_heads, _, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    r = num_heads // ng
    k_rep, v_rep = (x.repeat_interleave(r, dim=1) if r > 1 else x.contiguous() for x in (k, v))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q.contiguous(), k_rep, v_rep, out.contiguous(), lse.contiguous(), 0.0, causal,
        scale=scale,
    )  # fmt: skip
    if r > 1:
        dk, dv = (g.view(b, ng, r, sk, hn).sum(2, dtype=torch.float32) for g in (dk, dv))
    return dq.float(), dk.float(), dv.float()


_BLOCK_KERNELS = {
    "torch": (_torch_block_forward, _torch_block_backward),
    "fused": (_fused_block_forward, _fused_block_backward),
}


def resolve_backend(backend: str, *, device: torch.device, dtype: torch.dtype, has_mask: bool) -> str:
    """``auto`` -> ``fused`` where torch's CPU flash kernel applies (CPU, no explicit mask), else ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"ring attention backend must be one of {BACKENDS}, got {backend!r}")
    fused_ok = (
        device.type == "cpu"
        and not has_mask
        and dtype in _FUSED_DTYPES
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )
    if backend == "fused" and not fused_ok:
        raise ValueError(
            "ring attention backend 'fused' needs CPU tensors, no explicit attention mask and a float dtype "
            f"(got device={device.type}, dtype={dtype}, mask={'yes' if has_mask else 'no'}); use 'auto'"
        )
    if backend == "auto":
        return "fused" if fused_ok else "torch"
    return backend


def merge_partial_attention(out, lse, block_out, block_lse) -> None:
    """Online-softmax merge, in place: ``out [.., sq, hn]`` / ``lse [.., sq]`` (fp32) absorb a block's partial
    output and log-sum-exp. ``lse = -inf`` (nothing merged yet) is handled: its weight is exactly 0."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


# ---------------------------------------------------------------------------------------------------------
# The ring.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _RingSettings:
    cp_group: dist.ProcessGroup | None
    causal: bool
    softmax_scale: float
    backend: str
    stats: RingCommStats | None


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """``[s, b, h, d]`` -> ``[b, h, s, d]`` view."""
    return x.permute(1, 2, 0, 3)


def _mask_block(mask, *, ring: _Ring, source: int, plan: BlockPlan):
    """Rows ``plan.q_rows`` and the key columns of ``source``'s block (``plan.kv_rows``) of a key-ordered mask."""
    if mask is None:
        return None
    columns = local_token_positions(
        seq_length=mask.shape[-1], cp_size=ring.size, cp_rank=source, device=mask.device
    )[plan.kv_rows]
    return mask[:, :, plan.q_rows].index_select(-1, columns)


def _timed(ring: _Ring, fn, *args, **kwargs):
    if ring.stats is None:
        return fn(*args, **kwargs)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    ring.stats.compute_s += time.perf_counter() - start
    return result


def _ring_forward(q, k, v, mask, settings: _RingSettings, ring: _Ring):
    """Returns ``out [s, b, np, hn]`` (input dtype) and ``lse [b, np, s]`` (fp32)."""
    block_forward = _BLOCK_KERNELS[settings.backend][0]
    s_local, b, num_heads, hn = q.shape
    kv = torch.stack((k, v))  # [2, s, b, ng, hn]: one message per step
    out = torch.zeros(b, num_heads, s_local, hn, dtype=torch.float32, device=q.device)
    lse = torch.full((b, num_heads, s_local), float("-inf"), dtype=torch.float32, device=q.device)
    qh = _bhsd(q)
    for step in range(ring.size):
        incoming = kv_exchange = None
        if step + 1 < ring.size:
            incoming = torch.empty_like(kv)
            kv_exchange = ring.exchange(kv, incoming, _KV_TAG)
        source = (ring.rank - step) % ring.size
        plan = block_plan(
            cp_rank=ring.rank, cp_size=ring.size, step=step, local_seq_length=s_local, causal=settings.causal
        )
        block_out, block_lse = _timed(
            ring,
            block_forward,
            qh[:, :, plan.q_rows],
            _bhsd(kv[0, plan.kv_rows]),
            _bhsd(kv[1, plan.kv_rows]),
            scale=settings.softmax_scale,
            causal=plan.causal,
            mask=_mask_block(mask, ring=ring, source=source, plan=plan),
        )
        merge_partial_attention(out[:, :, plan.q_rows], lse[:, :, plan.q_rows], block_out, block_lse)
        if kv_exchange is not None:
            ring.wait(kv_exchange)
            kv = incoming
    return out.permute(2, 0, 1, 3).to(q.dtype).contiguous(), lse


def _ring_backward(dout, q, k, v, out, lse, mask, settings: _RingSettings, ring: _Ring):
    """Returns ``dq, dk, dv`` in the layouts and dtypes of ``q, k, v``."""
    block_backward = _BLOCK_KERNELS[settings.backend][1]
    s_local = q.shape[0]
    kv = torch.stack((k, v))
    dq = torch.zeros(_bhsd(q).shape, dtype=torch.float32, device=q.device)
    qh, douth, outh = _bhsd(q), _bhsd(dout), _bhsd(out)
    pending = None  # (exchange, received partial dK/dV, buffer being sent): the dK/dV relay in flight
    for step in range(ring.size):
        incoming = kv_exchange = None
        if step + 1 < ring.size:
            incoming = torch.empty_like(kv)
            kv_exchange = ring.exchange(kv, incoming, _KV_TAG)
        source = (ring.rank - step) % ring.size
        plan = block_plan(
            cp_rank=ring.rank, cp_size=ring.size, step=step, local_seq_length=s_local, causal=settings.causal
        )
        dq_block, dk_block, dv_block = _timed(
            ring,
            block_backward,
            douth[:, :, plan.q_rows],
            qh[:, :, plan.q_rows],
            _bhsd(kv[0, plan.kv_rows]),
            _bhsd(kv[1, plan.kv_rows]),
            outh[:, :, plan.q_rows],
            lse[:, :, plan.q_rows],
            scale=settings.softmax_scale,
            causal=plan.causal,
            mask=_mask_block(mask, ring=ring, source=source, plan=plan),
        )
        dq[:, :, plan.q_rows] += dq_block
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # gradient of block `source`
        dkv[0, plan.kv_rows] = dk_block.permute(2, 0, 1, 3)
        dkv[1, plan.kv_rows] = dv_block.permute(2, 0, 1, 3)
        if pending is not None:  # what ranks source .. rank-1 contributed to block `source`
            ring.wait(pending[0])
            dkv += pending[1]
        if ring.size > 1:  # pass the running sum on; the last hop brings our own block home
            received = torch.empty_like(dkv)
            pending = (ring.exchange(dkv, received, _DKV_TAG), received, dkv)
        if kv_exchange is not None:
            ring.wait(kv_exchange)
            kv = incoming
    if pending is not None:
        ring.wait(pending[0])
        dkv = pending[1]
    return dq.permute(2, 0, 1, 3).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """autograd wrapper: forward and backward both run the ring (see the module docstring)."""

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, settings: _RingSettings):
        ring = _Ring(settings.cp_group, settings.stats)
        out, lse = _ring_forward(query, key, value, attention_mask, settings, ring)
        ctx.save_for_backward(query, key, value, out, lse, attention_mask)
        ctx.settings = settings
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, attention_mask = ctx.saved_tensors
        ring = _Ring(ctx.settings.cp_group, ctx.settings.stats)
        dq, dk, dv = _ring_backward(
            grad_out.contiguous(), query, key, value, out, lse, attention_mask, ctx.settings, ring
        )
        return dq, dk, dv, None, None


def _check_inputs(query, key, value, attention_mask, *, cp_size: int, causal: bool) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            f"ring attention expects query [s, b, np, hn] and key/value [s, b, ng, hn]; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    s_local, b, num_heads, hn = query.shape
    if key.shape[0] != s_local or key.shape[1] != b or key.shape[3] != hn or num_heads % key.shape[2]:
        raise ValueError(
            f"key/value {tuple(key.shape)} do not fit query {tuple(query.shape)}: same s, b, hn and a number "
            "of key/value heads that divides the number of query heads are required"
        )
    if causal and cp_size > 1 and s_local % 2:
        raise ValueError(f"causal ring attention needs an even local sequence length (2 chunks), got {s_local}")
    if attention_mask is not None:
        expected = (s_local, s_local * cp_size)
        if attention_mask.dim() != 4 or tuple(attention_mask.shape[2:]) != expected:
            raise ValueError(
                f"attention_mask must be [b, 1 | np, s_local={s_local}, s_full={s_local * cp_size}] "
                f"(rows: this rank's queries; columns: all keys in original order), got "
                f"{tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[1] not in (1, num_heads) or attention_mask.shape[0] not in (1, b):
            raise ValueError(f"attention_mask batch/head dims {tuple(attention_mask.shape[:2])} do not broadcast")
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be bool (True = masked), got {attention_mask.dtype}")


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    backend: str = "auto",
    stats: RingCommStats | None = None,
) -> torch.Tensor:
    """Exact attention of this rank's queries over the keys/values of the whole CP group.

    ``query [s, b, np, hn]``, ``key``/``value [s, b, ng, hn]`` (local tokens, load-balanced order) ->
    ``[s, b, np, hn]``. ``softmax_scale`` defaults to ``1 / sqrt(hn)``. ``attention_mask``: optional bool
    ``[b | 1, 1 | np, s, s * cp]`` (True = masked; rows are this rank's queries, columns all keys in original
    order), applied on top of the causal mask when ``causal``. ``cp_group=None`` (or size 1) is plain attention.
    """
    cp_size = 1 if cp_group is None or not dist.is_initialized() else dist.get_world_size(cp_group)
    _check_inputs(query, key, value, attention_mask, cp_size=cp_size, causal=causal)
    settings = _RingSettings(
        cp_group=cp_group,
        causal=causal,
        softmax_scale=query.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale),
        backend=resolve_backend(
            backend, device=query.device, dtype=query.dtype, has_mask=attention_mask is not None
        ),
        stats=stats,
    )
    return RingAttentionFunction.apply(query, key, value, attention_mask, settings)
