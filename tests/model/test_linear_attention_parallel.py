"""Linear-attention mixers under tensor, sequence and pipeline parallelism, in real ``torchrun`` processes (gloo).

One launch of two processes runs this file as a script (``__main__`` below):
* TP: for each mixer (DeltaNet, GLA, Gated DeltaNet with grouped value heads), a tp=1 module is built and run;
  its full weights are then sharded by hand onto a tp=2 module (with and without sequence parallelism), and
  output, input gradient and every parameter gradient (gathered) must equal tp=1's.
* PP: a 4-layer hybrid GPT (``G D L A``) runs two microbatches through megatron-core's 1F1B schedule at pp=2;
  the losses and every layer's gradients must equal a pp=1 run of the same weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TOLERANCE = 1e-5
HIDDEN = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_tp2_sp_and_pp2_match_single_process():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for kind in ("D", "L", "G"):
        for sp in (False, True):
            assert f"tp2 {kind} sp={sp} ok" in result.stdout, output[-6000:]
    assert "pp2 ok" in result.stdout, output[-6000:]


# ---------------------------------------------------------------------------------------------- worker side
def _relative_error(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def _check(name, actual, expected):
    error = _relative_error(actual, expected)
    if not error < TOLERANCE:
        raise AssertionError(f"{name}: relative error {error:.3e}")


def _config(tp, sp, **extra):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64,
                             normalization="RMSNorm", tensor_model_parallel_size=tp, sequence_parallel=sp,
                             params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, **extra)


def _tensor_parallel_case(kind, linear_overrides):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import custom_backward
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from betterai_megatron.model.linear_attention import LinearAttentionConfig, linear_attention_spec

    spec = linear_attention_spec(kind, LinearAttentionConfig(chunk_size=8, **linear_overrides))
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(12, 2, HIDDEN, generator=gen)
    upstream = torch.randn(12, 2, HIDDEN, generator=gen)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(5)
    reference = build_module(spec, config=_config(1, False, add_bias_linear=True), layer_number=1)
    x_ref = x.clone().requires_grad_(True)
    out, bias = reference(x_ref)
    ((out + bias) * upstream).sum().backward()
    ref_out = (out + bias).detach()
    full = {name: p.detach().clone() for name, p in reference.named_parameters()}
    ref_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    parallel_state.destroy_model_parallel()

    for sp in (False, True):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        model_parallel_cuda_manual_seed(5)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        mixer = build_module(spec, config=_config(2, sp, add_bias_linear=True), layer_number=1)
        with torch.no_grad():
            for name, param in mixer.named_parameters():
                source = full[name]
                if getattr(param, "tensor_model_parallel", False):
                    source = source.chunk(2, dim=param.partition_dim)[rank]
                param.copy_(source)
        x_local = (x.chunk(2, dim=0)[rank] if sp else x).clone().requires_grad_(True)
        out, bias = mixer(x_local)
        upstream_local = upstream.chunk(2, dim=0)[rank] if sp else upstream
        # megatron's custom_backward (the engine call its schedules use), not Tensor.backward: the CPU bridge's
        # TorchFunctionMode intercepts Tensor.backward / torch.autograd.backward and runs them with the mode
        # disabled, so megatron's SP backward (allocating on torch.cuda.current_device()) fails on CPU
        loss = ((out + bias) * upstream_local).sum()
        custom_backward(loss, torch.ones_like(loss))
        for param in mixer.parameters():  # what megatron's finalize_model_grads does for SP-marked weights
            if sp and getattr(param, "sequence_parallel", False):
                dist.all_reduce(param.grad, group=tp_group)
        total = (out + bias).detach()
        input_grad = x_local.grad
        if sp:  # outputs and input grads are sequence-sharded
            total = torch.cat(_all_gather(total, tp_group), dim=0)
            input_grad = torch.cat(_all_gather(input_grad, tp_group), dim=0)
        _check(f"{kind} sp={sp} output", total, ref_out)
        _check(f"{kind} sp={sp} input grad", input_grad, x_ref.grad)
        for name, param in mixer.named_parameters():
            grad = param.grad
            if getattr(param, "tensor_model_parallel", False):
                grad = torch.cat(_all_gather(grad, tp_group), dim=param.partition_dim)
            _check(f"{kind} sp={sp} grad {name}", grad, ref_grads[name])
        _check_sharded_state_dict(mixer, full)
        parallel_state.destroy_model_parallel()
        if dist.get_rank() == 0:
            print(f"tp2 {kind} sp={sp} ok", flush=True)


def _all_gather(tensor, group):
    import torch
    import torch.distributed as dist

    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def _check_sharded_state_dict(mixer, full):
    """Every checkpoint tensor declares the tp=1 (global) shape, so checkpoints reshard across TP sizes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for key, item in mixer.sharded_state_dict(prefix="").items():
        if isinstance(item, ShardedTensor) and key in full:
            if tuple(item.global_shape) != tuple(full[key].shape):
                raise AssertionError(f"sharded_state_dict {key}: global shape {item.global_shape}, "
                                     f"expected {tuple(full[key].shape)}")


def _gpt(pattern, pre_process, post_process, layers):
    import copy
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from betterai_megatron.model.linear_attention import LinearAttentionConfig, linear_attention_spec

    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    specs = []
    for index in layers:
        spec = copy.deepcopy(base)
        if pattern[index] != "A":
            mixer = linear_attention_spec(pattern[index], LinearAttentionConfig(chunk_size=8))
            spec.submodules = dataclasses.replace(spec.submodules, self_attention=mixer)
        specs.append(spec)
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return specs, TransformerBlockSubmodules(layer_specs=specs, layer_norm=WrappedTorchNorm)


def _pipeline_case():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    pattern, vocab, seq, micro_batches = "GDLA", 64, 16, 2
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (micro_batches, 2, seq + 1), generator=gen)

    def run(pp):
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp)
        model_parallel_cuda_manual_seed(9)
        torch.manual_seed(9)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        per_stage = 4 // pp
        layers = list(range(stage * per_stage, (stage + 1) * per_stage))
        config = _config(1, False, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
        _, block = _gpt(pattern, stage == 0, stage == pp - 1, layers)
        model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=vocab, max_sequence_length=seq,
                         pre_process=stage == 0, post_process=stage == pp - 1,
                         share_embeddings_and_output_weights=False, position_embedding_type="none")
        return model, layers, config

    def step(model, config):
        batches = iter([{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens])

        def forward_step(iterator, model):
            batch = next(iterator)
            positions = torch.arange(seq).expand(2, seq)
            output = model(batch["tokens"], positions, None, labels=batch["labels"])

            def loss_func(losses):
                loss = losses.float().mean()
                return loss, {"loss": loss.detach()}

            return output, loss_func

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=micro_batches,
            seq_length=seq, micro_batch_size=2, forward_only=False)

    reference, _, config = run(1)
    full = {name: p.detach().clone() for name, p in reference.named_parameters()}
    ref_losses = [m["loss"] for m in step(reference, config)]
    ref_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    parallel_state.destroy_model_parallel()

    model, layers, config = run(2)

    def global_name(name):  # decoder.layers.<local> -> decoder.layers.<global>
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(layers[int(parts[2])])
        return ".".join(parts)

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(full[global_name(name)])
    losses = step(model, config)
    if parallel_state.is_pipeline_last_stage():
        for got, expected in zip([m["loss"] for m in losses], ref_losses):
            _check("pp2 loss", got, expected)
    for name, param in model.named_parameters():
        _check(f"pp2 grad {name}", param.grad, ref_grads[global_name(name)])
    parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        print("pp2 ok", flush=True)


def _worker():
    import torch
    import torch.distributed as dist

    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        _tensor_parallel_case("D", {})
        _tensor_parallel_case("L", {"gla_short_conv": True})
        _tensor_parallel_case("G", {"num_value_heads": 8})
        _pipeline_case()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
