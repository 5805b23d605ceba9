"""Plumbing shared by the linear-attention kernels: backend choice (our torch path vs fla's Triton kernels),
variable-length (``cu_seqlens``) handling for the torch path, and small tensor helpers.

Owns
* :func:`select_backend` — ``"torch"`` or ``"fla"`` for one call. ``"auto"`` picks fla's Triton kernels when the
  inputs live on CUDA and ``fla`` (flash-linear-attention >= 0.6, the ``fla`` extra) imports; otherwise our torch
  chunked kernels. The environment variable ``BETTERAI_LINEAR_ATTENTION_BACKEND`` (``auto|torch|fla``) overrides
  the default for every call that does not name a backend. Each (kernel, backend) choice is logged once per
  process, so a run's log says which kernels it used.
* :func:`run_varlen` — fla's ``cu_seqlens`` contract (``B == 1``, sequences packed along ``T``, one initial/final
  state per sequence) on top of a kernel that only knows equal-length batches: it runs the kernel once per
  sequence. That is a loop over sequences, which is fine for the CPU path this serves.
* :func:`l2norm` — fla's ``l2norm`` (``x / sqrt(sum(x^2) + eps)``, eps 1e-6), so ``use_qk_l2norm_in_kernel`` means
  the same thing on both backends.

Hand-written because fla has no CPU path (its ops are Triton) and its ``naive.py`` references are token-by-token
loops, far too slow to train with.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable

import torch

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "BETTERAI_LINEAR_ATTENTION_BACKEND"
_BACKENDS = ("auto", "torch", "fla")
_LOGGED: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def fla_ops():
    """The ``fla.ops`` module, or ``None`` when flash-linear-attention (and Triton) cannot be imported."""
    try:
        return importlib.import_module("fla.ops")
    except Exception as error:  # ImportError, or Triton failing to find a GPU/compiler at import
        logger.debug("fla is not usable (%s); linear attention uses the torch kernels", error)
        return None


def select_backend(kernel_name: str, reference: torch.Tensor, backend: str | None) -> str:
    """Choose ``"torch"`` or ``"fla"`` for one call of ``kernel_name`` on tensors like ``reference``.

    ``backend``: ``"auto"`` (or ``None``: the environment variable, else auto), ``"torch"`` or ``"fla"``.
    Asking for ``"fla"`` where it cannot run is an error, not a silent fallback.
    """
    requested = backend or os.environ.get(BACKEND_ENV_VAR, "auto") or "auto"
    if requested not in _BACKENDS:
        source = "backend=" if backend else f"${BACKEND_ENV_VAR}="
        raise ValueError(f"{kernel_name}: {source}{requested!r} is not one of {_BACKENDS}")
    if requested == "auto":
        chosen = "fla" if (reference.is_cuda and fla_ops() is not None) else "torch"
    elif requested == "fla":
        if fla_ops() is None:
            raise RuntimeError(
                f"{kernel_name}: backend 'fla' was requested but flash-linear-attention is not importable; "
                "install the 'fla' extra (pip install 'betterai_megatron[fla]') on a CUDA machine"
            )
        if not reference.is_cuda:
            raise RuntimeError(f"{kernel_name}: backend 'fla' needs CUDA tensors, got {reference.device}")
        chosen = "fla"
    else:
        chosen = "torch"
    if (kernel_name, chosen) not in _LOGGED:
        _LOGGED.add((kernel_name, chosen))
        where = "fla Triton kernel" if chosen == "fla" else "torch chunked/recurrent kernel"
        logger.info("linear attention: %s uses the %s (device %s)", kernel_name, where, reference.device)
    return chosen


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (as fla accumulates), fp64 kept (useful for gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's L2 normalisation over the last dim: ``x / sqrt(sum(x^2) + eps)``."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def check_no_extra_kwargs(kernel_name: str, kwargs: dict, allowed: tuple[str, ...] = ()) -> None:
    """Reject keyword arguments that fla would reject or that the torch path does not implement."""
    if "head_first" in kwargs:
        raise ValueError(f"{kernel_name}: head_first was removed in fla; inputs are [B, T, H, ...]")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{kernel_name}: unexpected keyword arguments {unknown}")


def check_varlen(kernel_name: str, q: torch.Tensor, initial_state, cu_seqlens) -> None:
    """fla's rules for ``cu_seqlens``: batch 1 and one initial state per sequence."""
    if cu_seqlens is None:
        return
    if q.shape[0] != 1:
        raise ValueError(
            f"{kernel_name}: the batch size must be 1 when cu_seqlens is given (got {q.shape[0]}); "
            "flatten variable-length inputs along T first"
        )
    if initial_state is not None and initial_state.shape[0] != len(cu_seqlens) - 1:
        raise ValueError(
            f"{kernel_name}: {len(cu_seqlens) - 1} sequences need as many initial states, "
            f"got {initial_state.shape[0]}"
        )


def run_varlen(
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    sequence_tensors: dict[str, torch.Tensor | None],
    *,
    cu_seqlens: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    **kernel_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run an equal-length ``kernel`` once per packed sequence.

    ``sequence_tensors``: name -> ``[1, T, ...]`` tensor (or None) split along T at ``cu_seqlens`` ``[N + 1]``.
    Returns ``o [1, T, ...]`` and the stacked final states ``[N, ...]`` (or None).
    """
    bounds = [int(b) for b in cu_seqlens.tolist()]
    outputs, finals = [], []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        pieces = {name: (t[:, start:end] if t is not None else None) for name, t in sequence_tensors.items()}
        h0 = initial_state[index : index + 1] if initial_state is not None else None
        o, final = kernel(**pieces, initial_state=h0, output_final_state=output_final_state, **kernel_kwargs)
        outputs.append(o)
        finals.append(final)
    final_state = torch.cat(finals, dim=0) if output_final_state else None
    return torch.cat(outputs, dim=1), final_state
