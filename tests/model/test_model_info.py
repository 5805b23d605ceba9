"""Memory estimate against hand-computed numbers, the equations of Korthikanti et al. 2022, and the tensors
autograd really saves in a megatron-core forward; the ``betterai model-info`` command (tables, JSON, default world
size, clean config errors).

This file is also a worker script (``__main__``): it builds models with ``build_model_chunks`` in one process and
sums the bytes of the distinct storages that autograd saves for backward during one forward + loss
(``torch.autograd.graph.saved_tensors_hooks``; parameters excluded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from betterai_megatron.config import load_config
from betterai_megatron.model.memory_estimate import (
    ActivationShape,
    chunk_activation_bytes,
    estimate_memory,
    in_flight_chunks,
    layer_activation_bytes,
    smallest_world_size,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def _config(*overrides):
    return load_config(None, ["data.mock=true", *overrides])


# ------------------------------------------------------------------------------------- Korthikanti et al. 2022
S, B, H, A = 256, 2, 64, 4  # sequence, micro-batch, hidden, heads


def _paper_model(*extra):
    """The paper's GPT: MHA, 4h GELU MLP, dropout everywhere, 16-bit activations."""
    return _config(f"model.hidden_size={H}", f"model.num_attention_heads={A}", "model.num_query_groups=null",
                   "model.activation=gelu", "model.ffn_hidden_size=null", "model.qk_layernorm=false",
                   "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "model.params_dtype=bf16",
                   "model.num_layers=8", *extra).model


def _shape(tp, sp, kernel="unfused", cp=1):
    return ActivationShape(seq_length=S, micro_batch_size=B, tp=tp, cp=cp, etp=tp, sequence_parallel=sp,
                           attention_kernel=kernel, bytes_per_element=2)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layer_activations_match_the_paper(tp):
    model, t = _paper_model(), tp
    sbh = S * B * H
    # eq. (1)/(2): tensor parallel without sequence parallelism: s b h (10 + 24/t + 5 a s / (h t))
    assert layer_activation_bytes(model, 1, _shape(tp, False)) == pytest.approx(
        sbh * (10 + 24 / t + 5 * A * S / (H * t)), rel=1e-12)
    if tp > 1:  # eq. (4): with sequence parallelism everything is split: s b h / t (34 + 5 a s / h)
        assert layer_activation_bytes(model, 1, _shape(tp, True)) == pytest.approx(
            sbh / t * (34 + 5 * A * S / H), rel=1e-12)
        # eq. (5): selective recompute of the core attention: 34 s b h / t
        assert layer_activation_bytes(model, 1, _shape(tp, True), selective_recompute=True) == pytest.approx(
            34 * sbh / t, rel=1e-12)
        # full recompute: only each layer's input, 2 s b h / t
        full = _paper_model("model.recompute=full", "model.recompute_num_layers=1")
        kept, transient = chunk_activation_bytes(full, (1, 2, 3, 4), _shape(tp, True))
        assert kept == pytest.approx(4 * 2 * sbh / t)
        assert transient == pytest.approx(sbh / t * (34 + 5 * A * S / H))


def test_first_stage_holds_pipeline_depth_micro_batches_and_interleaving_penalty():
    model = _paper_model("model.hidden_dropout=0.0", "model.attention_dropout=0.0")
    layer = layer_activation_bytes(model, 1, _shape(1, False))
    # pp=2, 16 micro-batches, 8 layers: 1F1B stage 0 holds 2 micro-batches x 4 layers = L layers (sec. 4.2.3)
    config = _config("model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=null",
                     "model.activation=gelu", "model.ffn_hidden_size=null", "model.qk_layernorm=false",
                     "model.params_dtype=bf16", "model.num_layers=8", "model.transformer_impl=local",
                     f"train.seq_length={S}", f"train.micro_batch_size={B}", f"train.global_batch_size={16 * B}",
                     "parallel.pp=2")
    stage0 = estimate_memory(model=config.model, parallel=config.parallel, train=config.train, world_size=2)[0]
    assert stage0.in_flight == 2
    assert stage0.activations_bytes == pytest.approx(8 * layer, abs=1)
    # interleaved, vpp=2: L (1 + (pp - 1) / (pp vpp)) = 8 * 1.25 layers on stage 0
    parallel = dataclasses.replace(config.parallel, vpp=2)
    stage0 = estimate_memory(model=config.model, parallel=parallel, train=config.train, world_size=2)[0]
    assert stage0.activations_bytes == pytest.approx(10 * layer, abs=1)


def test_in_flight_micro_batches():
    assert [in_flight_chunks(pp=4, vpp=1, pp_rank=r, num_micro_batches=8) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight_chunks(pp=4, vpp=1, pp_rank=r, num_micro_batches=2) for r in range(4)] == [2, 2, 2, 1]
    # megatron-core's interleaved warm-up: 2 (pp - r - 1) + (vpp - 1) pp, plus the one in its forward
    assert [in_flight_chunks(pp=4, vpp=2, pp_rank=r, num_micro_batches=8) for r in range(4)] == [11, 9, 7, 5]
    assert in_flight_chunks(pp=1, vpp=1, pp_rank=0, num_micro_batches=8) == 1


@pytest.mark.parametrize("pattern", [None, "GA"])
def test_context_parallel_divides_activations(pattern):
    """Issue 6: each CP rank holds s / cp tokens of every sequence (ring attention: no s x s scores)."""
    overrides = ["model.preset=tiny", "train.seq_length=256", "model.transformer_impl=local"]
    if pattern:
        overrides.append(f"model.layer_pattern={pattern}")
    config = _config(*overrides)
    one = estimate_memory(model=config.model, parallel=config.parallel, train=config.train, world_size=1,
                          attention_kernel="flash")[0]
    parallel = dataclasses.replace(config.parallel, cp=2)
    two = estimate_memory(model=config.model, parallel=parallel, train=config.train, world_size=2)[0]
    # Under CP each linear-attention layer also keeps, per local token and value head, K more value columns
    # (fp32 activations here) and K fp32 values for the cross-rank state correction: for "GA" one layer x 128 local
    # tokens x micro-batch 2 x 4 value heads x K=16 x (4 + 4) bytes.
    cp_extra = 1 * 128 * 2 * 4 * 16 * (4 + 4) if pattern else 0
    assert two.activations_bytes == pytest.approx(one.activations_bytes / 2 + cp_extra, abs=1)
    assert two.weights_bytes == one.weights_bytes


# ------------------------------------------------------------------------------------- measured on a real model
MEASURED_CASES = {  # the paper's setting (MHA, LayerNorm, GELU), and a LayerNorm/GELU MoE with GQA
    "paper": ["model.preset=tiny", "model.hidden_size=256", "model.ffn_hidden_size=null", "model.activation=gelu",
              "model.qk_layernorm=false", "model.normalization=LayerNorm", "model.num_query_groups=null",
              "train.seq_length=256", "train.micro_batch_size=2"],
    "moe": ["model.preset=tiny-moe", "model.hidden_size=256", "model.activation=gelu",
            "model.normalization=LayerNorm", "train.seq_length=256", "train.micro_batch_size=1"],
}
MEASURE_BASE = ["model.init=megatron", "model.transformer_impl=local"]


def test_estimate_is_close_to_saved_tensors_of_a_real_forward():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(MEASURED_CASES)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for name, overrides in MEASURED_CASES.items():
        config = _config(*MEASURE_BASE, *overrides)
        estimate = estimate_memory(model=config.model, parallel=config.parallel, train=config.train,
                                   world_size=1)[0].activations_bytes
        # the local path also keeps RoPE's cos/sin, the causal mask and (MHA) V as a view of the whole QKV output
        assert 0.85 <= estimate / measured[name] <= 1.05, (name, estimate, measured[name])


def _measure(cases: dict) -> None:
    import torch

    from betterai_megatron.model.builder import build_model_chunks
    from betterai_megatron.parallel.layout import destroy_parallel, initialize_parallel
    from betterai_megatron.platform.distributed import init_distributed

    init_distributed(backend="gloo")
    results = {}
    for name, overrides in cases.items():
        config = _config(*MEASURE_BASE, *overrides)
        initialize_parallel(config.parallel, seed=1)
        (model,), _ = build_model_chunks(model=config.model, parallel=config.parallel,
                                         seq_length=config.train.seq_length, seed=1)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor, parameters=parameters, saved=saved):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        s, b = config.train.seq_length, config.train.micro_batch_size
        tokens = torch.randint(0, config.model.vocab_size, (b, s))
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(tokens, positions, None, labels=tokens)
        results[name] = sum(saved.values())
        del model, loss
        destroy_parallel()
    print("RESULT " + json.dumps(results), flush=True)


# ------------------------------------------------------------------------------------- model state, by hand
def test_model_state_bytes_by_hand():
    # tiny (106,880 params), bf16, Adam, dp=2 with the distributed optimizer:
    config = _config("model.preset=tiny", "model.params_dtype=bf16", "parallel.distributed_optimizer=true")
    stage = estimate_memory(model=config.model, parallel=config.parallel, train=config.train, world_size=2)[0]
    assert stage.params.total == 106880
    assert stage.weights_bytes == 106880 * 2
    assert stage.grads_bytes == 106880 * 4  # fp32 main grads, unsharded
    assert stage.optimizer_bytes == 106880 * (4 + 8) // 2  # fp32 master + 2 moments, over dp=2
    # without the distributed optimizer: bf16 weights 2 + fp32 grads 4 + 12 = 18 bytes per parameter
    parallel = dataclasses.replace(config.parallel, distributed_optimizer=False)
    stage = estimate_memory(model=config.model, parallel=parallel, train=config.train, world_size=2)[0]
    assert stage.weights_bytes + stage.grads_bytes + stage.optimizer_bytes == 18 * 106880


def test_expert_optimizer_state_is_sharded_over_expert_data_parallel_ranks():
    # tiny-moe, ep=2 on 4 GPUs: dp=4, expert dp = 4 / ep = 2. Routed experts: 2 layers x 4 experts x 12,288.
    config = _config("model.preset=tiny-moe", "parallel.ep=2", "parallel.distributed_optimizer=true",
                     "train.global_batch_size=8")
    stage = estimate_memory(model=config.model, parallel=config.parallel, train=config.train, world_size=4)[0]
    expert_on_rank = 2 * 2 * 12288  # 2 of 4 experts per layer
    dense = 181120 - 2 * 4 * 12288
    assert (stage.params.expert, stage.params.dense) == (expert_on_rank, dense)
    assert stage.optimizer_bytes == dense * 8 // 4 + expert_on_rank * 8 // 2  # fp32 Adam moments only


def test_smallest_world_size():
    config = _config("model.preset=tiny-moe", "parallel.tp=2", "parallel.pp=2", "parallel.ep=2")
    assert smallest_world_size(config.parallel) == 8  # expert grid etp*ep*pp = 2*2*2
    config = _config("model.preset=tiny-moe", "parallel.tp=2", "parallel.ep=2", "parallel.etp=1")
    assert smallest_world_size(config.parallel) == 2


# ------------------------------------------------------------------------------------- the command
def test_command_json():
    result = subprocess.run([sys.executable, "-m", "betterai_megatron", "model-info", "--config", str(TINY), "--json",
                             "model.preset=tiny-moe", "parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
                             "parallel.distributed_optimizer=true"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["parameters"]["total"] == 181120 and report["parameters"]["active"] == 131968
    assert report["layout"]["world_size"] == 8 and report["layout"]["dp"] == 2  # default: smallest world
    assert report["layout"]["sequence_parallel"] is True
    assert [s["layers"] for s in report["stages"]] == [[1], [2]]
    assert report["peak_bytes_per_gpu"] == max(s["total_bytes"] for s in report["stages"])


def test_command_table(capsys):
    from betterai_megatron.cli import main

    assert main(["model-info", "--config", str(TINY), "--world-size", "4", "parallel.pp=2"]) == 0
    out = capsys.readouterr().out
    assert "total 106,880" in out and "dp 2" in out and "pp 1+out" in out and "pp 0+emb" in out


@pytest.mark.parametrize("args,message", [
    (["--world-size", "3", "parallel.tp=2"], "world size 3 is not divisible"),
    (["parallel.tp=3"], "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["model.hiden_size=3"], "did you mean 'model.hidden_size'"),
    (["parallel.tp=2", "model.ffn_hidden_size=129"], "model.ffn_hidden_size=129 is not divisible by parallel.tp=2"),
])
def test_command_config_errors_exit_2(capsys, args, message):
    from betterai_megatron.cli import main

    assert main(["model-info", "--config", str(TINY), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("betterai model-info: ")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _measure(json.loads(sys.argv[1]))
