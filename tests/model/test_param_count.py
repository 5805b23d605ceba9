"""``param_count`` against the parameters of megatron-core models actually built by ``build_model_chunks``.

Two independent references:

* hand-counted totals for the ``tiny`` and ``tiny-moe`` presets (tensor by tensor, in the test);
* real models: this file is also the worker script (``__main__``). It builds each case's model chunks after
  ``initialize_parallel`` and reports, per rank, the number of elements it holds, plus the model's unique parameter
  count: the all-reduced sum of the elements each rank *owns*. A rank owns a parameter unless another rank holds
  the same values: a copy on another data-parallel / context-parallel rank (owned by dp rank 0 and cp rank 0;
  routed experts by expert-data-parallel rank 0), a copy on another tensor-parallel rank (megatron marks split
  tensors ``tensor_model_parallel``; unmarked ones are owned by (expert-)tp rank 0), or the tied output layer that
  megatron-core gives the last pipeline stage (a copy of the first stage's embedding).

Single-process builds run many config variants in one subprocess; one ``torchrun --nproc-per-node 4`` launch
builds the parallel layouts one after another (tp=2 pp=2 ep=2 MoE, vpp, dp, a hybrid linear-attention model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from betterai_megatron.config import load_config
from betterai_megatron.model.param_count import count_parameters, stage_layers, stage_parameters

REPO = Path(__file__).resolve().parents[2]
BASE = ["model.init=megatron", "model.transformer_impl=local", "data.mock=true"]

SINGLE_PROCESS_CASES = {
    "tiny": ["model.preset=tiny"],
    "tiny-moe": ["model.preset=tiny-moe"],
    "untied-gelu-bias-layernorm-learned": [
        "model.preset=tiny", "model.tie_embeddings=false", "model.activation=gelu", "model.add_bias_linear=true",
        "model.normalization=LayerNorm", "model.position_embedding=learned_absolute", "model.qk_layernorm=true",
        "train.seq_length=48"],
    "gate-mha-squared-relu": [
        "model.preset=tiny", "model.attention_output_gate=true", "model.num_query_groups=null",
        "model.activation=squared_relu", "model.qk_layernorm=false"],
    "gqa1-kv-channels-nope": [
        "model.preset=tiny", "model.num_query_groups=1", "model.kv_channels=24", "model.nope_layer_interval=2",
        "model.rotary_percent=0.5", "model.vocab_size=1000", "model.ffn_hidden_size=null"],
    "no-position-gate-bias": [
        "model.preset=tiny", "model.position_embedding=none", "model.attention_output_gate=true",
        "model.add_bias_linear=true"],
    "moe-mixed-layers-bias": [
        "model.preset=tiny-moe", "model.num_layers=4", "model.moe.layer_freq=2",
        "model.moe.shared_expert_ffn_hidden_size=null", "model.add_bias_linear=true", "model.activation=gelu"],
    "moe-list-freq-untied-layernorm": [
        "model.preset=tiny-moe", "model.num_layers=3", "model.moe.layer_freq=[0,1,1]", "model.tie_embeddings=false",
        "model.normalization=LayerNorm", "model.moe.router_topk=3"],
    "hybrid-GDLA": ["model.preset=tiny", "model.num_layers=4", "model.layer_pattern=GDLA"],
    "hybrid-GLD-custom-mixers": [
        "model.preset=tiny", "model.num_layers=3", "model.layer_pattern=GLD",
        "model.linear_attention.key_head_dim=8", "model.linear_attention.value_head_dim=24",
        "model.linear_attention.gla_short_conv=true", "model.linear_attention.conv_kernel_size=3",
        "model.linear_attention.gla_gate_low_rank_dim=8"],
    "hybrid-G-grouped-values": ["model.preset=tiny", "model.layer_pattern=GA",
                                "model.linear_attention.num_value_heads=8", "model.linear_attention.num_heads=2"],
    "hybrid-no-output-gate": ["model.preset=tiny", "model.num_layers=3", "model.layer_pattern=DLG",
                              "model.linear_attention.output_gate=false"],
    "hybrid-LLDG-moe-bias": [
        "model.preset=tiny-moe", "model.num_layers=4", "model.layer_pattern=LDGA", "model.add_bias_linear=true",
        "model.moe.shared_expert_ffn_hidden_size=null"],
}

PARALLEL_CASES = {  # run on 4 processes
    "moe tp2 pp2 ep2 etp1": ["model.preset=tiny-moe", "parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
                             "parallel.etp=1"],
    "moe tp2 ep2 dp2": ["model.preset=tiny-moe", "parallel.tp=2", "parallel.ep=2", "model.tie_embeddings=false"],
    "dense tp2 pp2 vpp2 untied bias learned": [
        "model.preset=tiny", "model.num_layers=4", "parallel.tp=2", "parallel.pp=2", "parallel.vpp=2",
        "model.tie_embeddings=false", "model.add_bias_linear=true", "model.normalization=LayerNorm",
        "model.position_embedding=learned_absolute"],
    "dense pp2 dp2 tied": ["model.preset=tiny", "parallel.pp=2"],
    "hybrid GDLA tp2 pp2": ["model.preset=tiny", "model.num_layers=4", "model.layer_pattern=GDLA",
                            "parallel.tp=2", "parallel.pp=2"],
    "dense dp4": ["model.preset=tiny", "model.attention_output_gate=true"],
}


def _config(overrides):
    return load_config(None, BASE + list(overrides))


def _run_worker(cases: dict, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = str(Path(__file__).resolve())
    if nproc == 1:
        command = [sys.executable, script, json.dumps(cases)]
    else:
        from tests.conftest import free_port

        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, json.dumps(cases)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output[-6000:]
    return json.loads(lines[0][len("RESULT "):])


# ------------------------------------------------------------------------------------------------ hand counts
def test_tiny_preset_matches_hand_count():
    # h=64, 4 heads of 16, 2 query groups, ffn 128 SwiGLU, RMSNorm, qk-norm, vocab 512, tied, 2 layers.
    layer = 64 + (64 + 2 * 32) * 64 + 16 + 16 + 64 * 64 + 64 + 2 * 128 * 64 + 64 * 128
    counts = count_parameters(_config(["model.preset=tiny"]).model, seq_length=64)
    assert counts.total == 2 * layer + 512 * 64 + 64 == 106880
    assert counts.active == counts.total and counts.routed_experts == 0 and counts.output_layer == 0


def test_tiny_moe_preset_matches_hand_count():
    # 4 experts of ffn 64 (top-2) + one shared expert of 64, router [4, 64].
    expert = 2 * 64 * 64 + 64 * 64
    layer = 2 * 64 + (64 + 2 * 32) * 64 + 32 + 64 * 64 + 4 * 64 + 4 * expert + expert
    counts = count_parameters(_config(["model.preset=tiny-moe"]).model, seq_length=64)
    assert counts.total == 2 * layer + 512 * 64 + 64 == 181120
    assert counts.active == counts.total - 2 * 2 * expert == 131968
    assert counts.routed_experts == 2 * 4 * expert


def test_stage_layers_follow_megatron_interleaving():
    # 8 layers, pp=2, vpp=2: chunks of 2 layers; rank 0 holds chunks 0 and 2, rank 1 chunks 1 and 3.
    assert stage_layers(num_layers=8, pp=2, vpp=2, pp_rank=0) == (1, 2, 5, 6)
    assert stage_layers(num_layers=8, pp=2, vpp=2, pp_rank=1) == (3, 4, 7, 8)
    assert stage_layers(num_layers=8, pp=4, vpp=None, pp_rank=3) == (7, 8)


def test_tied_embedding_copy_is_counted_on_the_last_stage_only_once_in_total():
    config = _config(["model.preset=tiny", "parallel.pp=2"])
    stages = stage_parameters(config.model, config.parallel, seq_length=64)
    total = count_parameters(config.model, seq_length=64).total
    assert sum(s.total for s in stages) == total + 512 * 64
    assert stages[1].has_output_layer and stages[0].has_embedding


# ------------------------------------------------------------------------------------------------ built models
@pytest.fixture(scope="module")
def single_process_counts():
    return _run_worker(SINGLE_PROCESS_CASES, nproc=1)


@pytest.mark.parametrize("name", list(SINGLE_PROCESS_CASES))
def test_single_process_build_matches(single_process_counts, name):
    config = _config(SINGLE_PROCESS_CASES[name])
    built = single_process_counts[name]
    expected = count_parameters(config.model, seq_length=config.train.seq_length, tp=config.parallel.tp).total
    assert built["unique_total"] == expected, (name, built, expected)
    assert built["per_rank"][0]["local"] == expected


@pytest.mark.distributed
def test_torchrun_layouts_match_per_rank_and_in_total():
    results = _run_worker(PARALLEL_CASES, nproc=4)
    for name, overrides in PARALLEL_CASES.items():
        config = _config(overrides)
        built = results[name]
        total = count_parameters(config.model, seq_length=config.train.seq_length, tp=config.parallel.tp).total
        assert built["unique_total"] == total, (name, built["unique_total"], total)
        stages = stage_parameters(config.model, config.parallel, seq_length=config.train.seq_length)
        for rank in built["per_rank"]:
            stage = stages[rank["pp_rank"]]
            assert rank["local"] == stage.total, (name, rank, stage)
            assert rank["expert"] == stage.expert, (name, rank, stage)


# ------------------------------------------------------------------------------------------------ worker
def _owned_numel(chunks, *, tie_embeddings: bool) -> int:
    """Elements this rank owns (see the module docstring)."""
    from megatron.core import parallel_state as ps

    dense_owner = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    expert_owner = ps.get_expert_data_parallel_rank() == 0
    owned = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if tie_embeddings and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            if ".mlp.experts." in name:
                tp_owner = getattr(param, "tensor_model_parallel", False) or ps.get_expert_tensor_parallel_rank() == 0
                owned += param.numel() if (expert_owner and tp_owner) else 0
            else:
                tp_owner = getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0
                owned += param.numel() if (dense_owner and tp_owner) else 0
    return owned


def _worker(cases: dict) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from betterai_megatron.config import validate_layout
    from betterai_megatron.model.builder import build_model_chunks
    from betterai_megatron.parallel.layout import destroy_parallel, initialize_parallel
    from betterai_megatron.platform.distributed import init_distributed

    info = init_distributed(backend="gloo")
    results = {}
    for name, overrides in cases.items():
        config = _config(overrides)
        validate_layout(config, info.world_size)
        initialize_parallel(config.parallel, seed=config.train.seed)
        chunks, _ = build_model_chunks(model=config.model, parallel=config.parallel,
                                       seq_length=config.train.seq_length, seed=config.train.seed)
        local = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        expert = sum(p.numel() for chunk in chunks for n, p in chunk.named_parameters() if ".mlp.experts." in n)
        owned = torch.tensor([_owned_numel(chunks, tie_embeddings=config.model.tie_embeddings)], dtype=torch.int64)
        dist.all_reduce(owned)
        record = dict(rank=info.rank, pp_rank=ps.get_pipeline_model_parallel_rank(),
                      tp_rank=ps.get_tensor_model_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
                      local=local, expert=expert)
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, record)
        results[name] = dict(unique_total=int(owned.item()), per_rank=per_rank)
        del chunks
        destroy_parallel()
    if info.rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(json.loads(sys.argv[1]))
