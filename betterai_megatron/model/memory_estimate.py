"""Memory per GPU for a config and layout, per pipeline stage: weights, gradients, optimizer state, activations.

Model state (per parameter on the rank, counts from :mod:`.param_count`), as megatron-core keeps it:

* weights: ``model.params_dtype`` (2 bytes bf16/fp16, 4 fp32);
* gradients: 4 bytes — megatron-core DDP accumulates ``main_grad`` in an fp32 buffer (``grad_reduce_in_fp32=True``,
  what :mod:`betterai_megatron.training.trainer` sets), full size on every rank even with the distributed optimizer;
* optimizer: Adam's two fp32 moments (8 bytes; SGD: one fp32 momentum, 4) plus an fp32 master copy (4) when the
  weights are bf16/fp16. With ``parallel.distributed_optimizer`` this is sharded over the data-parallel ranks
  that hold the same weights: ``dp * cp`` for dense parameters, the expert-data-parallel size
  ``world / (etp * ep * pp)`` for routed experts. (bf16 Adam: 18 bytes/param, or ``6 + 12 / dp``; Rajbhandari
  et al. 2020, ZeRO, sec. 3.1.)

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(sec. 4), which counts the tensors each layer saves for the backward pass. With ``s`` tokens, micro-batch ``b``,
hidden ``h``, ``a`` heads, ``t`` = tp, 2-byte activations and 1-byte dropout masks, one GPT layer stores::

    no parallelism                 s b h (34 + 5 a s / h)
    tensor parallel                s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence parallel     s b h / t (34 + 5 a s / h)
    + selective recompute          s b h / t * 34            (core attention recomputed)
    full recompute                 2 s b h (/ t with sequence parallelism)   (only the layer input)

(34 = 4 for the two norm inputs, 2 QKV input, 4 Q and K, 2 V, 2 projection input, 1 attention dropout mask,
2 fc1 input, 8 GELU input, 8 fc2 input, 1 MLP dropout mask; 5 a s / h = softmax output 2, its dropout mask 1,
dropout output 2.) This module evaluates the same sum term by term, so the paper's setting gives exactly the
paper's numbers, and generalises it: activation bytes of ``model.params_dtype``; dropout masks only when
dropout > 0; GQA's smaller K and V (fused kernels; megatron-core's unfused attention repeats them to every
query head first); QK-norm inputs; the attention output gate; SwiGLU (fc1 output ``2f``, SiLU
output ``f``, fc2 input ``f``) instead of GELU; MoE (router logits and probabilities in fp32, ``top-k`` routed token
copies per token — balanced routing assumed — gathered over etp, and shared experts); linear-attention layers
(projections, convolution, output norm and gate, and what fla's chunked kernels save: the delta rule's
fp32 WY matrix ``A`` of ``C`` values per token and head, GLA's fp32 cumulative decay; the per-chunk states are
recomputed in the backward); fused "flash" attention (Transformer Engine, or ring attention
with context parallelism) stores no ``s x s`` scores, only an fp32 log-sum-exp per query and head. Context
parallelism divides every term by ``cp`` (each rank holds ``s / cp`` tokens of every sequence); a linear-attention
layer under CP also keeps, per token and value head, ``K`` more value columns in its kernel and an fp32
state-to-output map of ``K`` values (the cross-rank state correction of :mod:`betterai_megatron.kernels.
cp_linear_attention`), so its share falls slightly slower than ``1 / cp``.

Pipeline schedule (Korthikanti sec. 4.2.3; Narayanan et al. 2021, sec. 2.2): 1F1B keeps ``min(pp - r, M)``
micro-batches in flight on stage ``r`` (``M`` micro-batches per step), so stage 0 holds ``pp`` micro-batches of
``L / pp`` layers; the interleaved schedule keeps ``min(M v, 2 (pp - r - 1) + (v - 1) pp + 1)`` model chunks in
flight (megatron-core's warm-up), i.e. ``L (1 + (pp - 1) / (pp v))`` layers on stage 0. The last stage adds the
output layer's input and the fp32 softmax of the vocab-parallel cross entropy for one micro-batch; full
recompute adds the transient activations of one recomputed group during its backward.

Measured against the tensors autograd saves in a real megatron-core forward on CPU (``saved_tensors_hooks``,
tests/model/test_model_info.py): the paper's setting (LayerNorm, GELU, MHA) is within 10%; the CPU path saves
more than this estimate where torch's kernels do: torch's composite RMSNorm keeps its normalised output too
(+1 ``s b h`` per norm), and the torch chunked linear-attention kernels keep per-chunk matrices that fla's
kernels recompute (about 2x for a G/D/L layer).

Not counted: temporary buffers (communication, workspace, the allocator's fragmentation), CUDA context, the
pipeline's send/receive buffers. Expect real peaks some 10-20% higher.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from betterai_megatron.config.model import ModelConfig
from betterai_megatron.config.parallel import ParallelConfig
from betterai_megatron.config.train import TrainConfig
from betterai_megatron.model.param_count import StageParams, linear_attention_sizes, stage_parameters

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_OPTIMIZER_STATE_BYTES = {"adam": 8, "sgd": 4}  # fp32 moments / momentum per parameter
GRAD_BYTES = 4  # fp32 main_grad buffer


@dataclass(frozen=True)
class LayoutSizes:
    """Group sizes of a layout at a world size (data parallelism is what remains)."""

    world_size: int
    tp: int
    pp: int
    vpp: int  # model chunks per pipeline rank (1 without interleaving)
    cp: int
    ep: int
    etp: int
    dp: int  # data parallel (without cp)
    expert_dp: int  # ranks holding the same routed experts: world / (etp * ep * pp)
    sequence_parallel: bool
    num_micro_batches: int  # per optimiser step on each data-parallel rank


def sequence_parallel_enabled(*, model: ModelConfig, parallel: ParallelConfig) -> bool:
    """Explicit choice, else on where megatron-core requires it (MoE with tp > 1). Mirrors
    :func:`betterai_megatron.model.transformer_config.sequence_parallel_enabled`, which imports megatron-core."""
    if parallel.sequence_parallel is not None:
        return parallel.sequence_parallel and parallel.tp > 1
    return model.is_moe and parallel.tp > 1


def smallest_world_size(parallel: ParallelConfig) -> int:
    """The smallest world size the layout fits: a multiple of tp*pp*cp and of the expert grid etp*ep*pp."""
    etp = parallel.etp or parallel.tp
    return math.lcm(parallel.tp * parallel.pp * parallel.cp, etp * parallel.ep * parallel.pp)


def layout_sizes(*, model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, world_size: int) -> LayoutSizes:
    """Sizes for a layout already checked by :func:`betterai_megatron.config.validate_layout`."""
    etp = parallel.etp or parallel.tp
    dp = world_size // (parallel.tp * parallel.pp * parallel.cp)
    return LayoutSizes(
        world_size=world_size, tp=parallel.tp, pp=parallel.pp,
        vpp=parallel.vpp if parallel.vpp and parallel.vpp > 1 else 1, cp=parallel.cp, ep=parallel.ep, etp=etp,
        dp=dp, expert_dp=world_size // (etp * parallel.ep * parallel.pp),
        sequence_parallel=sequence_parallel_enabled(model=model, parallel=parallel),
        num_micro_batches=max(1, train.global_batch_size // (train.micro_batch_size * dp)),
    )


def default_attention_kernel(*, model: ModelConfig, parallel: ParallelConfig) -> str:
    """"flash" (no s x s scores saved: Transformer Engine's fused attention, or ring attention for cp > 1) or
    "unfused" (megatron-core's local DotProductAttention, which saves the softmax)."""
    if parallel.cp > 1 or model.transformer_impl == "transformer_engine":
        return "flash"
    if model.transformer_impl == "local":
        return "unfused"
    return "flash" if importlib.util.find_spec("transformer_engine") is not None else "unfused"


# ------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationShape:
    """What one layer's saved activations depend on, for one micro-batch on one rank."""

    seq_length: int  # tokens of a whole sequence
    micro_batch_size: int
    tp: int
    cp: int
    etp: int
    sequence_parallel: bool
    attention_kernel: str  # "flash" or "unfused"
    bytes_per_element: int  # activation dtype

    @property
    def tokens(self) -> int:  # tokens of the micro-batch on this rank's CP slice
        return self.seq_length // self.cp * self.micro_batch_size

    @property
    def sequence_side_tokens(self) -> float:  # tokens of an [s, b, h] tensor outside the TP regions
        return self.tokens / (self.tp if self.sequence_parallel else 1)

    def tp_region(self, width: int) -> float:  # elements of a [s, b, width] tensor split over tp
        return self.tokens * width / self.tp


def _softmax_attention_bytes(model: ModelConfig, shape: ActivationShape, *, selective: bool) -> float:
    p, h = shape.bytes_per_element, model.hidden_size
    h_q, h_kv = model.num_attention_heads * model.head_dim, model.query_groups * model.head_dim
    elements = shape.sequence_side_tokens * h  # QKV input
    if model.qk_layernorm:  # the norms' inputs are views of linear_qkv's output, which stays alive whole
        elements += shape.tp_region(h_q + 2 * h_kv + (h_q if model.attention_output_gate else 0))
    # Q, K for Q K^T and V for P V; megatron-core's unfused DotProductAttention first repeats K and V to every
    # query head (GQA), fused kernels take them unexpanded.
    kv_width = h_q if shape.attention_kernel == "unfused" else h_kv
    elements += shape.tp_region(h_q + 2 * kv_width)
    elements += shape.tp_region(h_q) * (3 if model.attention_output_gate else 1)  # proj input (+ gate, ungated)
    total = elements * p
    scores = shape.tokens * shape.seq_length * model.num_attention_heads / shape.tp  # local queries x all keys
    if shape.attention_kernel == "flash":
        total += shape.tokens * model.num_attention_heads / shape.tp * 4  # fp32 log-sum-exp
    elif not selective:
        total += scores * p  # softmax output
        if model.attention_dropout > 0:
            total += scores * (1 + p)  # dropout mask and dropout output
    return total


def _linear_attention_bytes(model: ModelConfig, kind: str, shape: ActivationShape) -> float:
    z = linear_attention_sizes(model, kind)
    p, heads, value_channels = shape.bytes_per_element, z["key_heads"], z["value_heads"] * z["value_head_dim"]
    elements = shape.sequence_side_tokens * model.hidden_size  # in_proj input
    elements += shape.tp_region(heads * z["group_width"])  # in_proj output
    elements += 2 * shape.tp_region(heads * z["conv_width"])  # convolution output before / after SiLU
    elements += 4 * shape.tp_region(value_channels)  # kernel output, normed, silu(gate), out_proj input
    total = elements * p
    if kind == "L":
        total += shape.sequence_side_tokens * z["gate_rank"] * p  # low-rank gate's hidden
        total += shape.tp_region(heads * z["key_head_dim"]) * 4  # fp32 cumulative log-decay per key channel
    else:  # delta rule: the chunk's WY matrix A, C fp32 values per token and value head (fla saves it)
        total += shape.tp_region(z["value_heads"] * z["chunk_size"]) * 4
    if shape.cp > 1:  # CP kernels (kernels/cp_linear_attention.py): values widened by K identity columns, and the
        # fp32 state-to-output map Qeff [tokens, value heads, K] kept for the cross-rank correction o += Qeff S
        total += shape.tp_region(z["value_heads"] * z["key_head_dim"]) * (p + 4)
    return total


def _mlp_bytes(model: ModelConfig, ffn: int, shape: ActivationShape, *, tokens_factor: float = 1.0) -> float:
    """fc1 output (GELU input; SwiGLU: gate and up), SiLU output (SwiGLU), fc2 input, inside the TP region."""
    per_token = (4 if model.activation == "swiglu" else 2) * ffn
    return shape.tp_region(per_token) * tokens_factor * shape.bytes_per_element


def _moe_bytes(model: ModelConfig, shape: ActivationShape) -> float:
    moe, p, h = model.moe, shape.bytes_per_element, model.hidden_size
    tokens = shape.sequence_side_tokens  # tokens entering the router on this rank
    total = 2 * tokens * moe.num_experts * 4  # fp32 router logits and probabilities
    # top-k copies per token; the alltoall dispatcher gathers the copies over etp, each etp rank computes 1/etp
    # of every expert's FFN: expert input and probability-weighted output [copies, h], intermediates split.
    copies = moe.router_topk * tokens * shape.etp
    total += 2 * copies * h * p
    ffn = moe.ffn_hidden_size or model.resolved_ffn_hidden_size
    total += copies * (4 if model.activation == "swiglu" else 2) * ffn / shape.etp * p
    if moe.shared_expert_ffn_hidden_size:
        total += _mlp_bytes(model, moe.shared_expert_ffn_hidden_size, shape)
    return total


def layer_activation_bytes(model: ModelConfig, layer_number: int, shape: ActivationShape, *,
                           selective_recompute: bool = False) -> float:
    """Bytes one decoder layer saves for backward, for one micro-batch, on one rank (no full recompute)."""
    p, h = shape.bytes_per_element, model.hidden_size
    side = shape.sequence_side_tokens * h
    total = 2 * side * p  # inputs of the two norms
    mixer = model.mixer_for_layer(layer_number)
    if mixer == "A":
        total += _softmax_attention_bytes(model, shape, selective=selective_recompute)
    else:
        total += _linear_attention_bytes(model, mixer, shape)
    if model.is_moe_layer(layer_number):
        total += side * p  # router / shared-expert input
        total += _moe_bytes(model, shape)
    else:
        total += side * p  # fc1 input
        total += _mlp_bytes(model, model.resolved_ffn_hidden_size, shape)
    if model.hidden_dropout > 0:
        total += 2 * side  # 1-byte masks after attention and after the MLP
    return total


def chunk_activation_bytes(model: ModelConfig, layers: tuple[int, ...], shape: ActivationShape) -> tuple[float, float]:
    """(bytes kept per in-flight micro-batch, transient bytes while recomputing) for one model chunk."""
    full = [layer_activation_bytes(model, n, shape, selective_recompute=model.recompute == "selective")
            for n in layers]
    if model.recompute != "full":
        return sum(full), 0.0
    group_input = shape.sequence_side_tokens * model.hidden_size * shape.bytes_per_element
    n = max(1, model.recompute_num_layers)
    if model.recompute_method == "uniform":  # every group of n layers keeps only its input
        groups = [full[i:i + n] for i in range(0, len(full), n)]
        return len(groups) * group_input, max(sum(g) for g in groups)
    recomputed = full[:n]  # block: the first n layers of the chunk keep only their input
    return len(recomputed) * group_input + sum(full[n:]), max(recomputed, default=0.0)


def in_flight_chunks(*, pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> int:
    """Micro-batches (model chunks with interleaving) whose activations stage ``pp_rank`` holds at its peak."""
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - pp_rank, num_micro_batches)
    return min(num_micro_batches * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1)


# ------------------------------------------------------------------------------------------- per stage
@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of pipeline stage ``params.pp_rank``."""

    params: StageParams
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    in_flight: int  # micro-batches (model chunks with interleaving) in flight at the peak

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes


def optimizer_bytes_per_param(*, model: ModelConfig, optimizer: str) -> int:
    return _OPTIMIZER_STATE_BYTES[optimizer] + (4 if model.params_dtype in ("bf16", "fp16") else 0)


def _stage_activations(model: ModelConfig, layers: tuple[int, ...], sizes: LayoutSizes, shape: ActivationShape,
                       pp_rank: int) -> tuple[float, int]:
    per_chunk = len(layers) // sizes.vpp
    chunks = [layers[i * per_chunk:(i + 1) * per_chunk] for i in range(sizes.vpp)]
    kept, transient = zip(*(chunk_activation_bytes(model, c, shape) for c in chunks), strict=True)
    in_flight = in_flight_chunks(pp=sizes.pp, vpp=sizes.vpp, pp_rank=pp_rank,
                                 num_micro_batches=sizes.num_micro_batches)
    total = in_flight * sum(kept) / len(kept) + max(transient)
    side = shape.sequence_side_tokens * model.hidden_size
    if pp_rank == 0 and model.hidden_dropout > 0:
        total += in_flight * side  # embedding dropout mask
    if pp_rank == sizes.pp - 1:  # one micro-batch: final norm and output-layer inputs, fp32 softmax over the vocab
        total += 2 * side * shape.bytes_per_element
        total += shape.tokens * model.padded_vocab_size(sizes.tp) / sizes.tp * 4
    return total, in_flight


def estimate_memory(*, model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, world_size: int,
                    attention_kernel: str | None = None) -> list[StageMemory]:
    """Memory on one rank of each pipeline stage (ranks of a stage differ only by expert-routing imbalance)."""
    sizes = layout_sizes(model=model, parallel=parallel, train=train, world_size=world_size)
    shape = ActivationShape(
        seq_length=train.seq_length, micro_batch_size=train.micro_batch_size, tp=sizes.tp, cp=sizes.cp,
        etp=sizes.etp, sequence_parallel=sizes.sequence_parallel,
        attention_kernel=attention_kernel or default_attention_kernel(model=model, parallel=parallel),
        bytes_per_element=_DTYPE_BYTES[model.params_dtype],
    )
    state_bytes = optimizer_bytes_per_param(model=model, optimizer=train.optimizer)
    dense_shards = sizes.dp * sizes.cp if parallel.distributed_optimizer else 1
    expert_shards = sizes.expert_dp if parallel.distributed_optimizer else 1
    stages = []
    for params in stage_parameters(model, parallel, seq_length=train.seq_length):
        activations, in_flight = _stage_activations(model, params.layers, sizes, shape, params.pp_rank)
        stages.append(StageMemory(
            params=params,
            weights_bytes=params.total * _DTYPE_BYTES[model.params_dtype],
            grads_bytes=params.total * GRAD_BYTES,
            optimizer_bytes=math.ceil(params.dense * state_bytes / dense_shards)
            + math.ceil(params.expert * state_bytes / expert_shards),
            activations_bytes=math.ceil(activations),
            in_flight=in_flight,
        ))
    return stages
