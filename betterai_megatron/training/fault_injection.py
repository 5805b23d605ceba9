"""Fault-injection hooks for tests and drills: NaN losses, a crash in the middle of a checkpoint save, a stall.

Off unless the environment variable ``BETTERAI_FAULT_INJECTION`` holds a JSON object; never set it in real runs.
Keys (steps count optimiser steps from 1, as the logs do; ``rank`` is the global rank):

``{"nan_loss": {"steps": [3, 5], "ranks": [1], "value": "nan"}}``
    this rank's loss of those steps becomes NaN (``"value": "inf"`` for +Inf) before the backward pass, so its
    gradients are non-finite too — what a diverging run or a bad batch on one data-parallel rank looks like.
    ``ranks`` defaults to all ranks. (Only the last pipeline stage computes a loss.)
``{"crash_in_save": {"step": 4, "rank": 0}}``
    SIGKILL this process after it has written its part of the step-4 checkpoint and before the tracker
    (``latest_checkpointed_iteration.txt``) is moved to it: the moment a crash would lose the most.
``{"stall_after_step": {"step": 5, "seconds": 600, "until_file": "/tmp/go"}}``
    sleep after that step (and after any save of it), giving a test a deterministic window for ``kill -9`` or
    a signal; the stall ends early when ``until_file`` exists or this rank receives a preemption signal.

Hand-written: megatron-core's rerun state machine injects faults into its own result validation only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from functools import lru_cache, partial

import torch

ENV_VAR = "BETTERAI_FAULT_INJECTION"
_KNOWN = {"nan_loss": {"steps", "ranks", "value"}, "crash_in_save": {"step", "rank"},
          "stall_after_step": {"step", "seconds", "until_file"}}

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def plan() -> dict:
    """The parsed, checked ``BETTERAI_FAULT_INJECTION`` (empty when unset)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_VAR} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(parsed, dict):
        raise TypeError(f"{ENV_VAR} must be a JSON object, got {text!r}")
    for kind, spec in parsed.items():
        if kind not in _KNOWN:
            raise ValueError(f"{ENV_VAR}: unknown fault {kind!r}; known: {sorted(_KNOWN)}")
        unknown = set(spec) - _KNOWN[kind] if isinstance(spec, dict) else {"<not an object>"}
        if unknown:
            raise ValueError(f"{ENV_VAR}: {kind} has unknown keys {sorted(unknown)}; known: {sorted(_KNOWN[kind])}")
    logger.warning("fault injection is ON (%s=%s)", ENV_VAR, text)
    return parsed


def forward_step_for(forward_step_func, *, step: int, rank: int):
    """``forward_step_func``, or a wrapper whose loss is non-finite when ``nan_loss`` targets (step, rank)."""
    spec = plan().get("nan_loss")
    if not spec or step not in spec.get("steps", []) or rank not in spec.get("ranks", [rank]):
        return forward_step_func
    bad = float("inf") if spec.get("value") == "inf" else float("nan")

    def poisoned_forward_step(data_iterator, model):
        output, loss_func = forward_step_func(data_iterator, model)
        return output, partial(_poisoned_loss, loss_func, bad)

    return poisoned_forward_step


def _poisoned_loss(loss_func, bad: float, output_tensor: torch.Tensor):
    """``loss_func``'s (loss, num_tokens, {name: [loss_sum, count]}) with the loss and reported sums made bad."""
    loss, *rest = loss_func(output_tensor)
    if rest and isinstance(rest[-1], dict):
        rest[-1] = {name: torch.cat([value[:1] * bad, value[1:]]) for name, value in rest[-1].items()}
    return (loss * bad, *rest)  # keeps the autograd graph: the backward pass yields non-finite gradients


def maybe_crash_in_save(*, step: int, rank: int) -> None:
    spec = plan().get("crash_in_save")
    if spec and spec.get("step") == step and spec.get("rank", 0) == rank:
        logger.error("fault injection: killing rank %d in the middle of saving step %d", rank, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall(*, step: int, interrupted=lambda: False) -> None:
    """Sleep as ``stall_after_step`` asks, ending early once ``interrupted()`` (e.g. a preemption signal)."""
    spec = plan().get("stall_after_step")
    if not spec or spec.get("step") != step:
        return
    seconds = float(spec.get("seconds", 600))
    logger.warning("fault injection: stalling up to %.0f s after step %d", seconds, step)
    deadline = time.monotonic() + seconds
    release = spec.get("until_file")
    while time.monotonic() < deadline and not interrupted() and not (release and os.path.exists(release)):
        time.sleep(0.05)
