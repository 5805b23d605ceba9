"""Linear-attention mixers in one process: the module against a token-by-token re-implementation of each paper's
layer written here (from the weights and the documented per-head projection layout), the generation contract
(prefill + single-token steps == one full call), and the spec factory inside a megatron ``TransformerLayer``."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from betterai_megatron.platform.cpu import enable_cpu_execution


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_tp1():
    """gloo world of one process + megatron parallel_state tp=pp=1 (torn down if this module created it)."""
    enable_cpu_execution()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created = not dist.is_initialized()
    if created:
        # private rendezvous: never export MASTER_PORT, which child processes would inherit while in use
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    initialized_here = not parallel_state.model_parallel_is_initialized()
    if initialized_here:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(123)
    yield
    if initialized_here:
        parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def transformer_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, normalization="RMSNorm",
                add_bias_linear=False, layernorm_epsilon=1e-5)
    base.update(overrides)
    return TransformerConfig(**base)


def build_mixer(kind, linear_config=None, layer_number=1, **config_overrides):
    from megatron.core.transformer.spec_utils import build_module

    from betterai_megatron.model.linear_attention import linear_attention_spec

    torch.manual_seed(7)
    mixer = build_module(linear_attention_spec(kind, linear_config), config=transformer_config(**config_overrides),
                         layer_number=layer_number)
    with torch.no_grad():  # non-trivial norm/bias values, so the reference checks where they enter
        mixer.out_norm_weight.uniform_(0.5, 1.5)
        if mixer.out_proj.bias is not None:
            mixer.out_proj.bias.normal_()
    return mixer


# ------------------------------------------------------------------ independent reference of the layers
def layout(kind, dk, dv, r, gate):
    """The documented per-key-head layout of in_proj's rows."""
    parts = [("q", dk), ("k", dk), ("v", r * dv)] + ([("z", r * dv)] if gate else [])
    if kind == "D":
        return parts + [("beta", 1)]
    if kind == "G":
        return parts + [("beta", r), ("alpha", r)]
    return parts


def reference_layer(kind, mixer, x):
    """x [s, b, h] -> output [s, b, h], one token at a time, float64."""
    lc, cfg = mixer.linear_config, mixer.config
    heads, dk, dv, r = mixer.num_key_heads, mixer.key_head_dim, mixer.value_head_dim, mixer.values_per_key
    x = x.double()
    seq, batch, _ = x.shape
    w_in = mixer.in_proj.weight.double()
    proj = torch.einsum("sbh,oh->sbo", x, w_in).reshape(seq, batch, heads, -1)
    names = layout(kind, dk, dv, r, lc.output_gate)
    parts, start = {}, 0
    for name, width in names:
        parts[name] = proj[..., start:start + width]
        start += width
    convolved = kind in "DG" or lc.gla_short_conv
    if convolved:  # depthwise causal conv over per-head [q | k | v] channels, then SiLU
        raw = torch.cat([parts["q"], parts["k"], parts["v"]], dim=-1).reshape(seq, batch, -1)
        taps = mixer.conv_weight.double()  # [C, W]
        width = taps.shape[1]
        out = torch.zeros_like(raw)
        for t in range(seq):
            for i in range(width):
                source = t - (width - 1) + i
                if source >= 0:
                    out[t] += taps[:, i] * raw[source]
        out = F.silu(out).reshape(seq, batch, heads, -1)
        parts["q"], parts["k"], parts["v"] = out.split([dk, dk, r * dv], dim=-1)
    q, k = parts["q"], parts["k"]
    v = parts["v"].reshape(seq, batch, heads * r, dv)
    if kind in "DG":
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if kind == "L":
        logits = x @ mixer.gate_down.weight.double().T @ mixer.gate_up.weight.double().T + mixer.gate_up.bias.double()
        decay = (F.logsigmoid(logits) / lc.gla_gate_normalizer).reshape(seq, batch, heads, dk)
    elif kind == "G":
        alpha = parts["alpha"].reshape(seq, batch, heads * r)
        decay = -mixer.A_log.double().exp() * F.softplus(alpha + mixer.dt_bias.double())
    if kind in "DG":
        beta = torch.sigmoid(parts["beta"].reshape(seq, batch, heads * r))
    o = torch.zeros(seq, batch, heads * r, dv, dtype=torch.float64)
    for b in range(batch):
        for hv in range(heads * r):
            h = hv // r
            state = torch.zeros(dk, dv, dtype=torch.float64)
            for t in range(seq):
                kt, vt = k[t, b, h], v[t, b, hv]
                if kind == "L":
                    state = decay[t, b, h].exp()[:, None] * state + torch.outer(kt, vt)
                else:
                    if kind == "G":
                        state = decay[t, b, hv].exp() * state
                    state = state + beta[t, b, hv] * torch.outer(kt, vt - kt @ state)
                o[t, b, hv] = (q[t, b, h] * dk ** -0.5) @ state
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon)
    o = o * mixer.out_norm_weight.double().reshape(heads * r, dv)
    if lc.output_gate:
        o = o * F.silu(parts["z"].reshape(seq, batch, heads * r, dv))
    out = o.reshape(seq, batch, -1) @ mixer.out_proj.weight.double().T
    if mixer.out_proj.bias is not None:
        out = out + mixer.out_proj.bias.double()
    return out


def relative_error(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


CASES = [
    ("D", {}, {}),
    ("L", {}, {}),
    ("G", {}, {}),
    ("G", {"num_value_heads": 8, "key_head_dim": 6, "value_head_dim": 5}, {}),  # grouped value heads
    ("L", {"gla_short_conv": True, "output_gate": False}, {"add_bias_linear": True}),
    ("D", {"conv_kernel_size": 2, "chunk_size": 4}, {}),
]


@pytest.mark.parametrize("kind,linear_overrides,config_overrides", CASES)
def test_mixer_matches_token_by_token_layer(megatron_tp1, kind, linear_overrides, config_overrides):
    from betterai_megatron.model.linear_attention import LinearAttentionConfig

    mixer = build_mixer(kind, LinearAttentionConfig(**linear_overrides), **config_overrides)
    x = torch.randn(13, 2, 32, generator=torch.Generator().manual_seed(3))
    out, bias = mixer(x, attention_mask=None)
    assert out.shape == (13, 2, 32)
    expected = reference_layer(kind, mixer, x)
    combined = out + bias if bias is not None else out
    assert relative_error(combined, expected) < 1e-5


class PlainContext:
    """The minimal object the generation engine may pass instead of megatron's StaticInferenceContext."""

    def __init__(self):
        self.key_value_memory_dict = {}
        self.sequence_len_offset = 0


@pytest.mark.parametrize("kind", ["D", "L", "G"])
@pytest.mark.parametrize("context_kind", ["plain", "megatron"])
def test_prefill_then_single_token_steps_equal_one_full_call(megatron_tp1, kind, context_kind):
    from megatron.core.inference.contexts import StaticInferenceContext

    from betterai_megatron.model.linear_attention import LinearAttentionConfig

    mixer = build_mixer(kind, LinearAttentionConfig(chunk_size=8), layer_number=3).eval()
    x = torch.randn(14, 2, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = mixer(x)
        context = PlainContext() if context_kind == "plain" else StaticInferenceContext(2, 64)
        pieces = [mixer(x[:9], inference_context=context)[0]]
        conv_state, recurrent_state = context.key_value_memory_dict[3]
        assert recurrent_state.shape == (mixer.local_value_heads, 2, mixer.key_head_dim, mixer.value_head_dim)
        assert recurrent_state.dtype == torch.float32 and conv_state.shape[1] == 2
        context.sequence_len_offset = 9
        pieces.append(mixer(x[9:11], inference_context=context)[0])  # a 2-token continuation (chunked path)
        for t in range(11, 14):
            context.sequence_len_offset = t
            pieces.append(mixer(x[t:t + 1], inference_context=context)[0])  # recurrent steps
        assert relative_error(torch.cat(pieces), full) < 1e-5
        # a new prompt (offset 0) starts from zero state even though the dict still holds the old one
        context.sequence_len_offset = 0
        assert relative_error(mixer(x[:5], inference_context=context)[0], full[:5]) < 1e-5


def test_beam_reordering_with_megatron_swap_keeps_states_consistent(megatron_tp1):
    from megatron.core.inference.contexts import StaticInferenceContext

    mixer = build_mixer("G", layer_number=1).eval()
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(5))
    swapped_input = x[:, [1, 0]]
    with torch.no_grad():
        context = StaticInferenceContext(2, 16)
        mixer(x[:5], inference_context=context)
        context.swap_key_value_dict([1, 0])
        context.sequence_len_offset = 5
        step = mixer(swapped_input[5:6], inference_context=context)[0]
        expected = mixer(swapped_input)[0][5:6]
    assert relative_error(step, expected) < 1e-5


def test_continuing_without_prefill_is_a_clear_error(megatron_tp1):
    mixer = build_mixer("D", layer_number=2)
    context = PlainContext()
    context.sequence_len_offset = 4
    with pytest.raises(RuntimeError, match="layer 2.*sequence_len_offset=0"):
        mixer(torch.randn(1, 1, 32), inference_context=context)


def test_spec_in_a_megatron_transformer_layer_trains(megatron_tp1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from betterai_megatron.model.linear_attention import GatedDeltaNetMixer, linear_attention_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules = dataclasses.replace(spec.submodules, self_attention=linear_attention_spec("G"))
    layer = build_module(spec, config=transformer_config(), layer_number=1)
    assert isinstance(layer.self_attention, GatedDeltaNetMixer)
    x = torch.randn(8, 2, 32, requires_grad=True)
    out, _ = layer(x, attention_mask=None)
    out.square().mean().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_bad_kind_and_bad_sizes_are_clear_errors(megatron_tp1):
    from betterai_megatron.model.linear_attention import LinearAttentionConfig, linear_attention_spec

    with pytest.raises(ValueError, match="'X' is not one of"):
        linear_attention_spec("X")
    with pytest.raises(ValueError, match="model.linear_attention.conv_kernel_size"):
        linear_attention_spec("G", LinearAttentionConfig(conv_kernel_size=1))
    with pytest.raises(ValueError, match="num_value_heads must equal num_heads"):
        build_mixer("D", LinearAttentionConfig(num_value_heads=8))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_mixer("G", LinearAttentionConfig(num_value_heads=6))
