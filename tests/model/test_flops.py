"""Model FLOPs against hand counts and the closed form of Narayanan et al. 2021; device peaks; MFU."""

from __future__ import annotations

from fractions import Fraction

import pytest

from betterai_megatron.config import load_config
from betterai_megatron.model.flops import (
    cpu_peak_tflops,
    flops_per_step,
    flops_per_token,
    model_flops_utilization,
    model_tflops_per_device,
    peak_tflops_for_device,
)


def _model(*overrides):
    return load_config(None, ["data.mock=true", *overrides]).model


def test_tiny_matches_hand_count():
    # tiny: h=64, 4 heads x 16, 2 query groups, SwiGLU ffn 128, vocab 512, 2 layers, s=64. Forward per token:
    qkv = 2 * 64 * (64 + 2 * 32)  # [h, h_q + 2 h_kv]
    proj = 2 * 64 * 64
    scores_and_values = 2 * 64 * 64 + 2 * 64 * 64  # Q K^T and P V over s=64 keys, h_q = 64
    mlp = 2 * 64 * 256 + 2 * 128 * 64  # fc1 [64, 2*128] (gate and up), fc2 [128, 64]
    logits = 2 * 64 * 512
    forward = 2 * (qkv + proj + scores_and_values + mlp) + logits
    assert flops_per_token(_model("model.preset=tiny"), seq_length=64) == 3 * forward == 737280
    assert flops_per_step(model=_model("model.preset=tiny"), seq_length=64, global_batch_size=8) \
        == 737280 * 64 * 8


def test_tiny_moe_counts_router_top_k_and_shared_experts():
    per_layer = (2 * 64 * 128 + 2 * 64 * 64 + 4 * 64 * 64  # attention as in tiny
                 + 2 * 64 * 4  # router [64, 4 experts]
                 + 2 * (2 * 64 * 128 + 2 * 64 * 64)  # top-2 experts of ffn 64 (SwiGLU)
                 + (2 * 64 * 128 + 2 * 64 * 64))  # shared expert of ffn 64
    forward = 2 * per_layer + 2 * 64 * 512
    assert flops_per_token(_model("model.preset=tiny-moe"), seq_length=64) == 3 * forward


@pytest.mark.parametrize("layers,hidden,heads,seq,vocab", [(2, 64, 4, 64, 512), (24, 1024, 16, 2048, 51200)])
def test_gpt_reduces_to_narayanan_closed_form(layers, hidden, heads, seq, vocab):
    """MHA, 4h GELU MLP, untied output: 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) per step without recompute,
    96 B s l h^2 (1 + s/(6h) + V/(16 l h)) with full recompute (the paper's eq. in appendix)."""
    model = _model(f"model.num_layers={layers}", f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
                   "model.num_query_groups=null", "model.activation=gelu", "model.ffn_hidden_size=null",
                   f"model.vocab_size={vocab}", "model.make_vocab_size_divisible_by=128",
                   "model.tie_embeddings=false", "model.recompute=full")
    batch = 3
    B, s, l, h, V = batch, seq, layers, hidden, model.padded_vocab_size(1)
    plain = 72 * B * s * l * h * h * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * l * h))
    recomputed = 96 * B * s * l * h * h * (1 + Fraction(s, 6 * h) + Fraction(V, 16 * l * h))
    assert flops_per_step(model=model, seq_length=s, global_batch_size=B) == plain
    assert flops_per_step(model=model, seq_length=s, global_batch_size=B, include_recompute=True) == recomputed


def test_gqa_gate_and_selective_recompute():
    base = _model("model.preset=tiny", "model.num_query_groups=null", "model.qk_layernorm=false")
    gqa = _model("model.preset=tiny", "model.num_query_groups=1", "model.qk_layernorm=false")
    gated = _model("model.preset=tiny", "model.num_query_groups=null", "model.attention_output_gate=true")
    # per layer, training: K and V projections shrink from 64 to 16 columns; the gate adds a [64, 64] projection
    assert flops_per_token(base, seq_length=64) - flops_per_token(gqa, seq_length=64) == 2 * 3 * 2 * 64 * (2 * 48)
    assert flops_per_token(gated, seq_length=64) - flops_per_token(base, seq_length=64) == 2 * 3 * 2 * 64 * 64
    selective = _model("model.preset=tiny", "model.recompute=selective")
    core_attention_forward = 2 * (2 * 64 * 64 * 2)  # 2 layers of Q K^T and P V
    assert flops_per_token(selective, seq_length=64, include_recompute=True) \
        == flops_per_token(selective, seq_length=64) + core_attention_forward


def test_gated_deltanet_layer_matches_hand_count():
    # One G layer of tiny with the mixer defaults: 4 key heads = 4 value heads, d_k = d_v = 16, output gate,
    # conv kernel 4, chunk 64. in_proj rows per head: q 16 + k 16 + v 16 + gate 16 + beta 1 + alpha 1 = 66.
    in_proj, out_proj = 2 * 64 * 4 * 66, 2 * 64 * 64
    conv = 2 * 4 * 48 * 4
    recurrence = 4 * (2 * 64 * 32 + 4 * 16 * 16 + 2 * 64 * 48 + 2 * 16 * 16)
    attention_layer = 2 * 64 * 128 + 2 * 64 * 64 + 4 * 64 * 64
    hybrid = _model("model.preset=tiny", "model.layer_pattern=GA")
    dense = _model("model.preset=tiny")
    difference = 3 * (in_proj + out_proj + conv + recurrence - attention_layer)
    assert flops_per_token(hybrid, seq_length=64) - flops_per_token(dense, seq_length=64) == difference


def test_device_peaks():
    assert peak_tflops_for_device("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_for_device("NVIDIA H100 PCIe") == 756.5
    assert peak_tflops_for_device("NVIDIA H200") == 989.4
    assert peak_tflops_for_device("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for_device("NVIDIA A100-SXM4-80GB", dtype="fp32") == 19.5
    assert peak_tflops_for_device("Some Future GPU") is None
    assert peak_tflops_for_device("cpu") > 0
    assert cpu_peak_tflops(cores=2, ghz=2.0, flops_per_cycle=32) == pytest.approx(0.128)


def test_mfu():
    assert model_tflops_per_device(flops_per_step=8e15, step_time_s=2.0, num_devices=8) == pytest.approx(500.0)
    assert model_flops_utilization(flops_per_step=8e15, step_time_s=2.0, num_devices=8,
                                   peak_tflops=1000.0) == pytest.approx(0.5)
