"""Model FLOPs per token and per optimiser step from the config, device peak TFLOP/s, and MFU.

The count follows Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (appendix "Floating-point operations"), written out per matrix multiplication so that GQA, the
attention output gate, SwiGLU, MoE and linear-attention layers are counted with their real widths:

* a ``[m, k] x [k, n]`` product costs ``2 m k n`` FLOPs; training costs 3x the forward pass (forward, data
  gradient, weight gradient), so per token and per weight matrix ``[k, n]``: ``6 k n``;
* softmax attention per token: ``2 s h_q`` for ``Q K^T`` and ``2 s h_q`` for ``P V`` (full ``s x s`` scores, no
  causal discount, as in the paper and in Megatron-LM's reported TFLOP/s);
* MoE layers count the router ``[h, E]``, ``top-k`` routed experts and the shared experts;
* linear-attention layers (D / L / G) count their projections (:mod:`.param_count` widths), the short
  convolution, GLA's low-rank gate, and the chunked recurrence with chunk size ``C``: per token and value head
  ``2 C (d_k + d_v)`` for the intra-chunk attention, ``4 d_k d_v`` for the inter-chunk read-out ``q S`` and the
  state update ``K^T V``; the delta rule (D, G) adds ``2 C (2 d_k + d_v) + 2 d_k d_v`` for its WY representation
  (``K K^T``, ``T K``, ``T V``, and the ``W S`` correction) — Yang et al. 2024, arXiv:2406.06484, sec. 3;
* the output layer: ``6 h V`` per token (``V`` the padded vocabulary).

Element-wise work (norms, activations, softmax, rotary) is not counted, as in the paper. For a GPT with MHA, a 4h
GELU MLP and untied output this reduces to the paper's ``72 B s l h^2 (1 + s/(6h) + V/(12 l h))`` per step;
``include_recompute=True`` adds the recomputed forward passes (full recompute: the paper's
``96 B s l h^2 (1 + s/(6h) + V/(16 l h))``; selective: the core attention). Model FLOPs utilisation (MFU, Chowdhery
et al. 2022, PaLM, appendix B) uses the count *without* recomputation.

Peak TFLOP/s are the vendors' dense (no sparsity) datasheet figures; CPUs get a nominal FMA peak.
"""

from __future__ import annotations

import os
import re

from betterai_megatron.config.model import ModelConfig
from betterai_megatron.model.param_count import linear_attention_sizes


def _glu(model: ModelConfig) -> int:
    return 2 if model.activation == "swiglu" else 1


def _mlp_forward_flops(model: ModelConfig, ffn: int) -> int:
    """Forward FLOPs per token of an MLP with hidden size ``ffn``: fc1 ``[h, glu f]`` and fc2 ``[f, h]``."""
    return 2 * model.hidden_size * ffn * (_glu(model) + 1)


def softmax_attention_forward_flops(model: ModelConfig, *, seq_length: int) -> tuple[int, int]:
    """(projection FLOPs, core-attention FLOPs) of one softmax-attention layer, forward, per token."""
    h, d = model.hidden_size, model.head_dim
    h_q, h_kv = model.num_attention_heads * d, model.query_groups * d
    qkv_out = h_q + 2 * h_kv + (h_q if model.attention_output_gate else 0)
    projections = 2 * h * qkv_out + 2 * h_q * h
    core = 2 * seq_length * h_q * 2  # Q K^T and P V over the full sequence
    return projections, core


def linear_attention_forward_flops(model: ModelConfig, kind: str) -> int:
    """Forward FLOPs per token of one linear-attention mixer (``kind`` D, L or G)."""
    z = linear_attention_sizes(model, kind)
    h, heads, dk, dv, chunk = (model.hidden_size, z["key_heads"], z["key_head_dim"], z["value_head_dim"],
                               z["chunk_size"])
    value_heads = z["value_heads"]
    flops = 2 * h * heads * z["group_width"] + 2 * value_heads * dv * h  # in_proj, out_proj
    flops += 2 * heads * z["conv_width"] * z["conv_kernel_size"]  # depthwise short convolution
    if kind == "L":
        flops += 2 * h * z["gate_rank"] + 2 * z["gate_rank"] * heads * dk  # low-rank forget gate
    per_head = 2 * chunk * (dk + dv) + 4 * dk * dv
    if kind in ("D", "G"):
        per_head += 2 * chunk * (2 * dk + dv) + 2 * dk * dv
    return flops + value_heads * per_head


def layer_forward_flops(model: ModelConfig, layer_number: int, *, seq_length: int) -> tuple[int, int]:
    """(FLOPs outside core attention, core-attention FLOPs) of one decoder layer, forward, per token."""
    mixer = model.mixer_for_layer(layer_number)
    if mixer == "A":
        flops, core = softmax_attention_forward_flops(model, seq_length=seq_length)
    else:
        flops, core = linear_attention_forward_flops(model, mixer), 0
    if model.is_moe_layer(layer_number):
        moe = model.moe
        flops += 2 * model.hidden_size * moe.num_experts  # router
        flops += moe.router_topk * _mlp_forward_flops(model, moe.ffn_hidden_size or model.resolved_ffn_hidden_size)
        if moe.shared_expert_ffn_hidden_size:
            flops += _mlp_forward_flops(model, moe.shared_expert_ffn_hidden_size)
    else:
        flops += _mlp_forward_flops(model, model.resolved_ffn_hidden_size)
    return flops, core


def flops_per_token(model: ModelConfig, *, seq_length: int, include_recompute: bool = False) -> int:
    """Training FLOPs (forward + backward) per token of a ``seq_length``-token sequence."""
    layers_flops = core_flops = 0
    for layer_number in range(1, model.num_layers + 1):
        flops, core = layer_forward_flops(model, layer_number, seq_length=seq_length)
        layers_flops += flops
        core_flops += core
    logits = 2 * model.hidden_size * model.padded_vocab_size(1)
    total = 3 * (layers_flops + core_flops + logits)
    if include_recompute:
        if model.recompute == "full":
            total += layers_flops + core_flops
        elif model.recompute == "selective":
            total += core_flops
    return total


def flops_per_step(*, model: ModelConfig, seq_length: int, global_batch_size: int,
                   include_recompute: bool = False) -> int:
    """Training FLOPs of one optimiser step: ``global_batch_size`` sequences of ``seq_length`` tokens."""
    return flops_per_token(model, seq_length=seq_length, include_recompute=include_recompute) * seq_length \
        * global_batch_size


# ------------------------------------------------------------------------------------------- peak and MFU
# Dense (no structured sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets: (pattern, bf16/fp16, fp32).
# The first pattern that matches torch.cuda.get_device_name() wins, so more specific names come first.
_GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    (r"GB200", 2500.0, 80.0),
    (r"B200", 2250.0, 80.0),
    (r"H200", 989.4, 66.9),  # H200 SXM; NVL: 835
    (r"H100.*PCIe", 756.5, 51.2),
    (r"H100.*NVL", 835.0, 60.0),
    (r"H100|GH200", 989.4, 66.9),  # SXM5
    (r"H800", 989.4, 66.9),
    (r"H20\b", 148.0, 44.0),
    (r"A100", 312.0, 19.5),
    (r"A800", 312.0, 19.5),
    (r"L40S", 362.1, 91.6),
    (r"L4\b", 121.0, 30.3),
    (r"A10\b", 125.0, 31.2),
]


def cpu_peak_tflops(*, cores: int, ghz: float, flops_per_cycle: int) -> float:
    """Nominal CPU peak: cores x clock x FLOPs per cycle per core."""
    return cores * ghz * flops_per_cycle / 1000.0


def _cpu_info() -> tuple[int, float, int]:
    """(usable cores, clock in GHz, fp32 FLOPs per cycle per core) read from Linux, with safe defaults."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ghz, flags = 2.0, ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
        mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, flags=re.MULTILINE)
        if mhz:
            ghz = max(float(m) for m in mhz) / 1000.0
        flags = " ".join(re.findall(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)[:1])
    except OSError:
        pass
    # two FMA units x SIMD lanes x 2 FLOPs: AVX-512 16 fp32 lanes, AVX2 8 lanes, otherwise (e.g. NEON) 4 lanes
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    return cores, ghz, 2 * lanes * 2


def peak_tflops_for_device(name: str | None, *, dtype: str = "bf16") -> float | None:
    """Dense peak TFLOP/s of one device named ``name`` (``torch.cuda.get_device_name()``; None or "cpu" for the
    CPU) for ``dtype`` ("bf16"/"fp16": tensor-core peak, "fp32": plain fp32). None for an unknown GPU: pass
    ``train.peak_tflops`` then. The CPU figure is a nominal fp32 FMA peak of the cores this process may use."""
    if name is None or name.lower() == "cpu":
        cores, ghz, per_cycle = _cpu_info()
        return cpu_peak_tflops(cores=cores, ghz=ghz, flops_per_cycle=per_cycle)
    for pattern, half, single in _GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            return single if dtype == "fp32" else half
    return None


def current_device_name() -> str:
    """``torch.cuda.get_device_name()`` of this process's GPU, or "cpu" (imports torch)."""
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def model_tflops_per_device(*, flops_per_step: int, step_time_s: float, num_devices: int) -> float:
    """Achieved model TFLOP/s per device."""
    return flops_per_step / step_time_s / num_devices / 1e12


def model_flops_utilization(*, flops_per_step: int, step_time_s: float, num_devices: int,
                            peak_tflops: float) -> float:
    """MFU in [0, 1]: achieved model FLOP/s over the devices' peak."""
    return model_tflops_per_device(flops_per_step=flops_per_step, step_time_s=step_time_s,
                                   num_devices=num_devices) / peak_tflops
