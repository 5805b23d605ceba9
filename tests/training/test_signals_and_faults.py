"""Unit tests of the stop request (real signals delivered to this process) and the fault-injection plan."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from betterai_megatron.training import fault_injection
from betterai_megatron.training.signals import (
    NO_STOP,
    STOP_DURATION,
    STOP_SIGNAL,
    StopRequest,
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_sets_the_flag_and_nothing_else(sig):
    stop = StopRequest().install()
    try:
        assert stop.local_reason() == NO_STOP
        os.kill(os.getpid(), sig)  # the process survives: the handler only records it
        time.sleep(0.01)
        assert stop.local_reason() == STOP_SIGNAL
        assert sig.name in stop.describe(STOP_SIGNAL)
    finally:
        stop.restore()
    assert signal.getsignal(sig) is not stop._handle


def test_exit_duration_requests_a_stop():
    stop = StopRequest(exit_duration_mins=0.5 / 60)
    assert stop.local_reason() == NO_STOP
    stop.start_time -= 1.0  # as if the run had started a second ago
    assert stop.local_reason() == STOP_DURATION
    assert "train.exit_duration_mins" in stop.describe(STOP_DURATION)


def test_fault_plan_is_empty_without_the_variable(monkeypatch):
    monkeypatch.delenv(fault_injection.ENV_VAR, raising=False)
    fault_injection.plan.cache_clear()
    marker = object()
    assert fault_injection.forward_step_for(marker, step=1, rank=0) is marker


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"nan_los": {}}', "unknown fault 'nan_los'"),
    ('{"nan_loss": {"step": [1]}}', "unknown keys \\['step'\\]"),
])
def test_fault_plan_rejects_bad_input(monkeypatch, text, message):
    monkeypatch.setenv(fault_injection.ENV_VAR, text)
    fault_injection.plan.cache_clear()
    try:
        with pytest.raises(ValueError, match=message):
            fault_injection.plan()
    finally:
        fault_injection.plan.cache_clear()


def test_nan_loss_poisons_only_the_targeted_step_and_rank(monkeypatch):
    monkeypatch.setenv(fault_injection.ENV_VAR, '{"nan_loss": {"steps": [3], "ranks": [1]}}')
    fault_injection.plan.cache_clear()
    weight = torch.ones(2, requires_grad=True)

    def forward_step(data_iterator, model):
        def loss_func(output):
            loss = (output * weight).sum()
            return loss, torch.tensor(2), {"lm loss": torch.stack([loss.detach().double(), torch.tensor(2.0).double()])}
        return torch.ones(2), loss_func

    try:
        assert fault_injection.forward_step_for(forward_step, step=3, rank=0) is forward_step
        assert fault_injection.forward_step_for(forward_step, step=2, rank=1) is forward_step
        poisoned = fault_injection.forward_step_for(forward_step, step=3, rank=1)
        output, loss_func = poisoned(None, None)
        loss, tokens, report = loss_func(output)
        assert torch.isnan(loss) and int(tokens) == 2
        assert torch.isnan(report["lm loss"][0]) and report["lm loss"][1] == 2.0  # token count untouched
        loss.backward()
        assert torch.isnan(weight.grad).all(), "the backward pass must see the NaN too"
    finally:
        fault_injection.plan.cache_clear()


def _layout(**changes):
    layout = {"tp": 2, "pp": 1, "vpp": None, "cp": 1, "ep": 1, "etp": 2, "dp": 2, "distributed_optimizer": True,
              "world_size": 4, "chained_optimizers": 1}
    return {**layout, **changes}


@pytest.mark.parametrize("saved, now, sharding, error", [
    (_layout(), _layout(dp=4, world_size=8), "dp_reshardable", None),  # dp only: megatron reshards it
    (_layout(), _layout(tp=1, etp=1), "dp_reshardable", "tp: 2 -> 1, etp: 2 -> 1"),
    (_layout(), _layout(tp=1, etp=1), "fully_reshardable", None),
    (_layout(distributed_optimizer=False), _layout(tp=1, pp=2, distributed_optimizer=False), "dp_reshardable", None),
    (_layout(distributed_optimizer=False), _layout(), "dp_reshardable", "distributed_optimizer=False cannot"),
    (_layout(ep=2, chained_optimizers=2, distributed_optimizer=False),  # MoE: dense + expert optimizers
     _layout(distributed_optimizer=False), "dp_reshardable", "saved by 2 chained optimizer.s. and this layout"),
])
def test_optimizer_reshard_rules(tmp_path, saved, now, sharding, error):
    from betterai_megatron.training.checkpoint_files import CheckpointError
    from betterai_megatron.training.checkpointing import _check_optimizer_reshardable

    metadata = {"distrib_optim_sharding_type": sharding}
    if error is None:
        _check_optimizer_reshardable(tmp_path, saved, now, metadata)
    else:
        with pytest.raises(CheckpointError, match=error) as info:
            _check_optimizer_reshardable(tmp_path, saved, now, metadata)
        assert "checkpoint.load_optimizer=false" in str(info.value)
