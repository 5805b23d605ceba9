"""Every parallel layout trains the same model to the same losses as one process (issue: foundation).

Real ``torchrun`` processes on gloo run ``betterai pretrain`` at a layout; the losses in ``metrics.jsonl`` of 5
optimiser steps are compared with a single-process run of the same config, seed and data (1e-4 relative).
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import read_metrics, run_betterai

STEPS = 5
DENSE = ["model.preset=tiny", "model.num_layers=4"]
MOE = ["model.preset=tiny-moe", "model.num_layers=2"]
QWEN_NEXT_HYBRID = [*DENSE, "model.layer_pattern=GGGA"]  # 3 Gated DeltaNet : 1 softmax attention
LINEAR_MIX = [*DENSE, "model.layer_pattern=DLGA"]  # DeltaNet, GLA, Gated DeltaNet, softmax
COMMON = [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8", "log.level=WARNING",
          "log.tensorboard=false"]

LAYOUTS = {
    "tp2": (DENSE, 2, ["parallel.tp=2"]),
    "pp2_4microbatches": (DENSE, 2, ["parallel.pp=2"]),  # dp=1: 8 / 2 = 4 micro-batches through 1F1B
    "pp2_vpp2": (DENSE, 2, ["parallel.pp=2", "parallel.vpp=2"]),
    "ep2_moe": (MOE, 2, ["parallel.ep=2"]),
    "tp2_ep2_moe_sp": (MOE, 4, ["parallel.tp=2", "parallel.ep=2"]),
    "tp2_pp2": (DENSE, 4, ["parallel.tp=2", "parallel.pp=2"]),
    "cp2": (DENSE, 2, ["parallel.cp=2"]),  # ring attention, load-balanced causal chunks, GQA (4 heads, 2 groups)
    "cp4": (DENSE, 4, ["parallel.cp=4"]),
    "cp2_tp2": (DENSE, 4, ["parallel.cp=2", "parallel.tp=2"]),
    "hybrid_GGGA_tp2": (QWEN_NEXT_HYBRID, 2, ["parallel.tp=2"]),
    "hybrid_GGGA_pp2": (QWEN_NEXT_HYBRID, 2, ["parallel.pp=2"]),
    "hybrid_DLGA_tp2": (LINEAR_MIX, 2, ["parallel.tp=2"]),
    "hybrid_DLGA_pp2": (LINEAR_MIX, 2, ["parallel.pp=2"]),
    # CP through linear-attention layers: conv halo + recurrent state across ranks, ring attention for the A layer
    "hybrid_GGGA_cp2": (QWEN_NEXT_HYBRID, 2, ["parallel.cp=2"]),
    "hybrid_GGGA_cp4": (QWEN_NEXT_HYBRID, 4, ["parallel.cp=4"]),
    "hybrid_GGGA_cp2_tp2": (QWEN_NEXT_HYBRID, 4, ["parallel.cp=2", "parallel.tp=2"]),
    "hybrid_DLGA_cp4": (LINEAR_MIX, 4, ["parallel.cp=4"]),
}

_reference_cache: dict[str, list[float]] = {}


def _losses(tmp_path, name, model, nproc, layout, tiny_config):
    run_dir = tmp_path / name
    run_betterai(["pretrain", "--config", str(tiny_config), f"run.dir={run_dir}", *COMMON, *model, *layout],
                 nproc=nproc)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def _reference(tmp_path_factory, model, tiny_config):
    key = " ".join(model)
    if key not in _reference_cache:
        _reference_cache[key] = _losses(tmp_path_factory.mktemp("ref"), "ref", model, 1, [], tiny_config)
    return _reference_cache[key]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, tmp_path, tmp_path_factory, tiny_config):
    model, nproc, layout = LAYOUTS[name]
    reference = _reference(tmp_path_factory, model, tiny_config)
    losses = _losses(tmp_path, name, model, nproc, layout, tiny_config)
    assert all(math.isfinite(x) for x in losses)
    assert reference[0] > reference[-1], "the reference run should learn something in 5 steps"
    for step, (ours, ref) in enumerate(zip(losses, reference), start=1):
        assert abs(ours - ref) <= 1e-4 * abs(ref), f"{name}: step {step} loss {ours} != single-process {ref}"
