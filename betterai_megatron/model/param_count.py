"""Analytic parameter counts from the config alone: whole model (total, active) and per pipeline stage / rank.

Owns the inventory of the parameter tensors megatron-core's ``GPTModel`` builds for a :class:`ModelConfig` (local
or Transformer Engine layer specs hold the same tensors; TE only fuses the input norm into ``linear_qkv``), and
how each tensor is spread over a parallel layout. No torch model is built and neither torch nor megatron-core
is imported here, so ``betterai model-info`` costs no more than loading the config.

Tensor inventory, per decoder layer ``l`` (``h`` hidden, ``d`` head dim, ``a`` heads, ``g`` query groups,
``h_q = a d``, ``h_kv = g d``, ``f`` FFN size, ``glu = 2`` for SwiGLU else 1, norms hold ``h`` weights, plus ``h``
biases for LayerNorm)::

    input_layernorm                      [h]                                   replicated over tp
    softmax attention (letter A):
      linear_qkv.weight                  [h_q + 2 h_kv (+ h_q with attention_output_gate), h]   split over tp
      linear_qkv.bias (add_bias_linear)  [same rows]                                              split over tp
      q_layernorm / k_layernorm          [d] each (qk_layernorm)                 replicated
      linear_proj.weight [h, h_q] split; linear_proj.bias [h] replicated (RowParallelLinear keeps the full bias)
    linear attention (D / L / G): see :func:`_linear_attention_tensors`
    pre_mlp_layernorm                    [h]                                   replicated
    dense MLP: linear_fc1 [glu f, h] (+ bias [glu f]) split; linear_fc2 [h, f] split (+ bias [h] replicated)
    MoE layer: router.weight [E, h] (+ bias [E]) replicated; E routed experts, each an MLP with f_e, split over
      ep (whole experts) and etp (fc1 rows / fc2 columns; the fc2 bias stays whole on every etp rank);
      shared experts: an MLP with f_s split over tp (megatron-core forbids biases there).

Outside the layers: word embeddings ``[V_pad, h]`` split over tp on the first stage, learned absolute positions
``[seq_length, h]`` replicated on the first stage, the final norm on the last stage, the output layer
``[V_pad, h]`` split over tp on the last stage. With tied embeddings the output layer reuses the embedding at
pp=1; at pp>1 megatron-core gives the last stage its own copy (kept equal by an all-reduce of the gradients),
so it is one model parameter but occupies memory on two stages.

"Active" parameters are those one token passes through: everything except the routed experts, plus ``top-k``
routed experts per MoE layer (shared experts always count); embeddings and the output layer are included.
"""

from __future__ import annotations

from dataclasses import dataclass

from betterai_megatron.config.loader import ConfigError
from betterai_megatron.config.model import ModelConfig
from betterai_megatron.config.parallel import ParallelConfig

# How a tensor is spread over the ranks of one pipeline stage.
REPLICATED = "replicated"  # whole on every tp rank (norms, row-parallel biases, router, position embedding)
TENSOR_PARALLEL = "tp"  # split over the tensor-parallel group
EXPERT = "expert"  # routed experts: whole experts over ep, each expert's matrices over etp
EXPERT_REPLICATED = "expert_replicated"  # routed-expert tensors split over ep only (fc2 bias)
_ROUTED = (EXPERT, EXPERT_REPLICATED)


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor (or, for routed experts, the same tensor of all ``E`` experts together)."""

    name: str  # megatron-core's parameter name below the layer / model, for messages
    numel: int  # full, unsharded element count
    sharding: str  # one of REPLICATED, TENSOR_PARALLEL, EXPERT, EXPERT_REPLICATED

    @property
    def routed_expert(self) -> bool:
        return self.sharding in _ROUTED


@dataclass(frozen=True)
class ParameterCounts:
    """Whole-model counts (elements)."""

    total: int
    active: int  # per token: all but the routed experts, plus top-k of them
    embedding: int  # word (+ learned position) embeddings
    output_layer: int  # 0 when tied with the embedding
    transformer_layers: int  # decoder layers and the final norm
    routed_experts: int  # all routed experts of all MoE layers

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output_layer


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one rank of pipeline stage ``pp_rank`` (the same on every tp / ep / dp rank of it)."""

    pp_rank: int
    layers: tuple[int, ...]  # 1-based decoder layer numbers, in the order of this rank's model chunks
    dense: int  # replicated over the data(-and-context)-parallel ranks
    expert: int  # routed-expert parameters, replicated over the expert-data-parallel ranks
    has_embedding: bool
    has_output_layer: bool  # the output layer (or, tied with pp > 1, the embedding copy) lives here

    @property
    def total(self) -> int:
        return self.dense + self.expert


# ------------------------------------------------------------------------------------------- inventory
def _norm(name: str, model: ModelConfig, size: int) -> list[ParamTensor]:
    tensors = [ParamTensor(f"{name}.weight", size, REPLICATED)]
    if model.normalization == "LayerNorm":
        tensors.append(ParamTensor(f"{name}.bias", size, REPLICATED))
    return tensors


def _mlp(prefix: str, model: ModelConfig, ffn: int, *, split: str, bias: bool) -> list[ParamTensor]:
    h, glu = model.hidden_size, 2 if model.activation == "swiglu" else 1
    tensors = [ParamTensor(f"{prefix}.linear_fc1.weight", glu * ffn * h, split)]
    if bias:
        tensors.append(ParamTensor(f"{prefix}.linear_fc1.bias", glu * ffn, split))
    tensors.append(ParamTensor(f"{prefix}.linear_fc2.weight", h * ffn, split))
    if bias:  # a row-parallel bias is added after the reduction: whole on every (e)tp rank
        tensors.append(ParamTensor(f"{prefix}.linear_fc2.bias", h,
                                   EXPERT_REPLICATED if split == EXPERT else REPLICATED))
    return tensors


def _softmax_attention_tensors(model: ModelConfig) -> list[ParamTensor]:
    h, d = model.hidden_size, model.head_dim
    h_q, h_kv = model.num_attention_heads * d, model.query_groups * d
    # megatron-core SelfAttention: the output gate's pre-activation comes out of linear_qkv (attention.py,
    # ``linear_qkv_out_dim += kv_channels * num_attention_heads``).
    qkv_rows = h_q + 2 * h_kv + (h_q if model.attention_output_gate else 0)
    tensors = [ParamTensor("self_attention.linear_qkv.weight", qkv_rows * h, TENSOR_PARALLEL)]
    if model.add_bias_linear:
        tensors.append(ParamTensor("self_attention.linear_qkv.bias", qkv_rows, TENSOR_PARALLEL))
    if model.qk_layernorm:  # one norm over the head dim, shared by all heads
        tensors += _norm("self_attention.q_layernorm", model, d) + _norm("self_attention.k_layernorm", model, d)
    tensors.append(ParamTensor("self_attention.linear_proj.weight", h * h_q, TENSOR_PARALLEL))
    if model.add_bias_linear:
        tensors.append(ParamTensor("self_attention.linear_proj.bias", h, REPLICATED))
    return tensors


def linear_attention_sizes(model: ModelConfig, kind: str) -> dict[str, int]:
    """Head counts and widths of a D / L / G mixer as :class:`LinearAttentionMixer` resolves them.

    Keys: ``key_heads``, ``value_heads``, ``key_head_dim``, ``value_head_dim``, ``group_width`` (``in_proj`` rows
    per key head: ``[q | k | v | gate | per-head scalars]``), ``conv_width`` (convolved channels per key head, 0
    without a short convolution), ``gate_rank`` (GLA's low-rank forget gate, else 0), ``conv_kernel_size``,
    ``chunk_size``.
    """
    lc = model.linear_attention
    key_heads = lc.num_heads or model.num_attention_heads
    value_heads = lc.num_value_heads or key_heads
    dk = lc.key_head_dim or model.head_dim
    dv = lc.value_head_dim or model.head_dim
    if (value_heads != key_heads and kind != "G") or value_heads % key_heads:
        raise ConfigError(f"model.linear_attention.num_value_heads={value_heads} must equal num_heads={key_heads} "
                          f"for layer kind {kind!r} (only G groups values) and be a multiple of it for G")
    r = value_heads // key_heads
    gate = r * dv if lc.output_gate else 0
    if kind == "D":
        group_width, conv_width = 2 * dk + dv + gate + 1, 2 * dk + dv  # + beta
    elif kind == "L":
        group_width, conv_width = 2 * dk + dv + gate, (2 * dk + dv) if lc.gla_short_conv else 0
    elif kind == "G":
        group_width, conv_width = 2 * dk + r * dv + gate + 2 * r, 2 * dk + r * dv  # + beta, alpha per value head
    else:
        raise ConfigError(f"model.layer_pattern letter {kind!r} is not one of A, D, L, G")
    return dict(key_heads=key_heads, value_heads=value_heads, key_head_dim=dk, value_head_dim=dv,
                group_width=group_width, conv_width=conv_width,
                gate_rank=lc.gla_gate_low_rank_dim if kind == "L" else 0,
                conv_kernel_size=lc.conv_kernel_size, chunk_size=lc.chunk_size)


def _linear_attention_tensors(model: ModelConfig, kind: str) -> list[ParamTensor]:
    """The tensors of :mod:`betterai_megatron.model.linear_attention` (``mixer.py`` and the D/L/G subclasses)."""
    z = linear_attention_sizes(model, kind)
    h, heads, value_channels = model.hidden_size, z["key_heads"], z["value_heads"] * z["value_head_dim"]
    tensors = [ParamTensor("self_attention.in_proj.weight", heads * z["group_width"] * h, TENSOR_PARALLEL)]
    if z["conv_width"]:
        tensors.append(ParamTensor("self_attention.conv_weight",
                                   heads * z["conv_width"] * z["conv_kernel_size"], TENSOR_PARALLEL))
    tensors.append(ParamTensor("self_attention.out_norm_weight", value_channels, TENSOR_PARALLEL))
    if kind == "L":  # low-rank forget gate: W_1 replicated, W_2 (with bias) column-parallel
        rank, key_channels = z["gate_rank"], heads * z["key_head_dim"]
        tensors += [ParamTensor("self_attention.gate_down.weight", rank * h, REPLICATED),
                    ParamTensor("self_attention.gate_up.weight", key_channels * rank, TENSOR_PARALLEL),
                    ParamTensor("self_attention.gate_up.bias", key_channels, TENSOR_PARALLEL)]
    if kind == "G":
        tensors += [ParamTensor("self_attention.A_log", z["value_heads"], TENSOR_PARALLEL),
                    ParamTensor("self_attention.dt_bias", z["value_heads"], TENSOR_PARALLEL)]
    tensors.append(ParamTensor("self_attention.out_proj.weight", h * value_channels, TENSOR_PARALLEL))
    if model.add_bias_linear:
        tensors.append(ParamTensor("self_attention.out_proj.bias", h, REPLICATED))
    return tensors


def _moe_tensors(model: ModelConfig) -> list[ParamTensor]:
    moe, h = model.moe, model.hidden_size
    experts = moe.num_experts
    tensors = [ParamTensor("mlp.router.weight", experts * h, REPLICATED)]
    if model.add_bias_linear:
        tensors.append(ParamTensor("mlp.router.bias", experts, REPLICATED))
    per_expert = _mlp("mlp.experts", model, moe.ffn_hidden_size or model.resolved_ffn_hidden_size,
                      split=EXPERT, bias=model.add_bias_linear)
    tensors += [ParamTensor(t.name, t.numel * experts, t.sharding) for t in per_expert]
    if moe.shared_expert_ffn_hidden_size:
        tensors += _mlp("mlp.shared_experts", model, moe.shared_expert_ffn_hidden_size,
                        split=TENSOR_PARALLEL, bias=False)
    return tensors


def layer_tensors(model: ModelConfig, layer_number: int) -> list[ParamTensor]:
    """Every parameter tensor of 1-based decoder layer ``layer_number``."""
    h = model.hidden_size
    mixer = model.mixer_for_layer(layer_number)
    tensors = _norm("input_layernorm", model, h)
    tensors += _softmax_attention_tensors(model) if mixer == "A" else _linear_attention_tensors(model, mixer)
    tensors += _norm("pre_mlp_layernorm", model, h)
    if model.is_moe_layer(layer_number):
        tensors += _moe_tensors(model)
    else:
        tensors += _mlp("mlp", model, model.resolved_ffn_hidden_size, split=TENSOR_PARALLEL,
                        bias=model.add_bias_linear)
    return tensors


def embedding_tensors(model: ModelConfig, *, seq_length: int, tp: int = 1) -> list[ParamTensor]:
    """First-stage tensors. The vocabulary is padded as the builder pads it, ``ModelConfig.padded_vocab_size(tp)``
    (the same for every tp that divides ``make_vocab_size_divisible_by``, larger for e.g. tp=3)."""
    tensors = [ParamTensor("embedding.word_embeddings.weight", model.padded_vocab_size(tp) * model.hidden_size,
                           TENSOR_PARALLEL)]
    if model.position_embedding == "learned_absolute":  # GPTModel's max_sequence_length is train.seq_length
        tensors.append(ParamTensor("embedding.position_embeddings.weight", seq_length * model.hidden_size,
                                   REPLICATED))
    return tensors


def output_tensors(model: ModelConfig, *, tied_copy: bool, tp: int = 1) -> list[ParamTensor]:
    """Last-stage tensors: the final norm and the output layer (``tied_copy``: the tied embedding's copy)."""
    tensors = _norm("decoder.final_layernorm", model, model.hidden_size)
    if not model.tie_embeddings or tied_copy:
        tensors.append(ParamTensor("output_layer.weight", model.padded_vocab_size(tp) * model.hidden_size,
                                   TENSOR_PARALLEL))
    return tensors


# ------------------------------------------------------------------------------------------- whole model
def _sum(tensors: list[ParamTensor]) -> int:
    return sum(t.numel for t in tensors)


def count_parameters(model: ModelConfig, *, seq_length: int, tp: int = 1) -> ParameterCounts:
    """Total and active parameter counts of the whole model (``tp`` only matters through the vocab padding)."""
    embedding = _sum(embedding_tensors(model, seq_length=seq_length, tp=tp))
    output_layer = 0 if model.tie_embeddings else model.padded_vocab_size(tp) * model.hidden_size
    final_norm = model.hidden_size * (2 if model.normalization == "LayerNorm" else 1)
    layers = routed = active_routed = 0
    for layer_number in range(1, model.num_layers + 1):
        tensors = layer_tensors(model, layer_number)
        layers += _sum(tensors)
        layer_routed = sum(t.numel for t in tensors if t.routed_expert)
        routed += layer_routed
        if layer_routed:  # the E experts are identical in shape: top-k of them are active
            active_routed += layer_routed // model.moe.num_experts * model.moe.router_topk
    total = embedding + output_layer + final_norm + layers
    return ParameterCounts(total=total, active=total - routed + active_routed, embedding=embedding,
                           output_layer=output_layer, transformer_layers=layers + final_norm,
                           routed_experts=routed)


# ------------------------------------------------------------------------------------------- per stage
def stage_layers(*, num_layers: int, pp: int, vpp: int | None, pp_rank: int) -> tuple[int, ...]:
    """1-based layers of pipeline rank ``pp_rank``: model chunk ``c = v * pp + pp_rank`` (v < vpp) holds the
    ``c``-th contiguous block of ``num_layers / (pp * vpp)`` layers (megatron-core's even split)."""
    chunks = vpp if vpp and vpp > 1 else 1
    per_chunk = num_layers // (pp * chunks)
    layers: list[int] = []
    for v in range(chunks):
        start = (v * pp + pp_rank) * per_chunk
        layers += range(start + 1, start + per_chunk + 1)
    return tuple(layers)


def divisibility_problems(model: ModelConfig, parallel: ParallelConfig) -> list[str]:
    """Sizes that megatron-core splits over tp / etp but the layout does not divide (it would assert while
    building). Each message names the config keys; empty when the layout fits."""
    tp, etp = parallel.tp, parallel.etp or parallel.tp
    problems = []
    if model.resolved_ffn_hidden_size % tp and not all(model.is_moe_layer(n) for n in range(1, model.num_layers + 1)):
        problems.append(f"model.ffn_hidden_size={model.resolved_ffn_hidden_size} is not divisible by parallel.tp={tp}")
    if model.is_moe:
        expert_ffn = model.moe.ffn_hidden_size or model.resolved_ffn_hidden_size
        if expert_ffn % etp:
            problems.append(f"model.moe.ffn_hidden_size={expert_ffn} is not divisible by parallel.etp={etp}")
        shared = model.moe.shared_expert_ffn_hidden_size
        if shared and shared % tp:
            problems.append(f"model.moe.shared_expert_ffn_hidden_size={shared} is not divisible by parallel.tp={tp}")
    for kind in sorted(set(model.layer_pattern or "") - {"A"}):
        heads = linear_attention_sizes(model, kind)["key_heads"]
        if heads % tp:
            problems.append(f"model.linear_attention.num_heads={heads} (layer kind {kind}) is not divisible by "
                            f"parallel.tp={tp}")
    return problems


def _divide(numel: int, by: int, what: str) -> int:
    if numel % by:
        raise ConfigError(f"{what} ({numel} elements) cannot be split evenly over {by} ranks")
    return numel // by


def shard_numel(tensor: ParamTensor, parallel: ParallelConfig) -> int:
    """Elements of ``tensor`` on one rank that holds it."""
    etp = parallel.etp or parallel.tp
    if tensor.sharding == TENSOR_PARALLEL:
        return _divide(tensor.numel, parallel.tp, f"{tensor.name} over parallel.tp={parallel.tp}")
    if tensor.sharding == EXPERT:
        return _divide(tensor.numel, parallel.ep * etp,
                       f"{tensor.name} over parallel.ep*etp={parallel.ep}*{etp}")
    if tensor.sharding == EXPERT_REPLICATED:
        return _divide(tensor.numel, parallel.ep, f"{tensor.name} over parallel.ep={parallel.ep}")
    return tensor.numel


def stage_tensors(model: ModelConfig, parallel: ParallelConfig, *, seq_length: int,
                  pp_rank: int) -> list[ParamTensor]:
    """Full-size tensors that one rank of pipeline stage ``pp_rank`` holds a shard of."""
    layers = stage_layers(num_layers=model.num_layers, pp=parallel.pp, vpp=parallel.vpp, pp_rank=pp_rank)
    tensors: list[ParamTensor] = []
    if pp_rank == 0:
        tensors += embedding_tensors(model, seq_length=seq_length, tp=parallel.tp)
    for layer_number in layers:
        tensors += [ParamTensor(f"decoder.layers.{layer_number - 1}.{t.name}", t.numel, t.sharding)
                    for t in layer_tensors(model, layer_number)]
    if pp_rank == parallel.pp - 1:
        tensors += output_tensors(model, tied_copy=parallel.pp > 1, tp=parallel.tp)
    return tensors


def stage_parameters(model: ModelConfig, parallel: ParallelConfig, *, seq_length: int) -> list[StageParams]:
    """Parameters on one rank of each pipeline stage, for this layout."""
    stages = []
    for pp_rank in range(parallel.pp):
        tensors = stage_tensors(model, parallel, seq_length=seq_length, pp_rank=pp_rank)
        dense = sum(shard_numel(t, parallel) for t in tensors if not t.routed_expert)
        expert = sum(shard_numel(t, parallel) for t in tensors if t.routed_expert)
        stages.append(StageParams(
            pp_rank=pp_rank,
            layers=stage_layers(num_layers=model.num_layers, pp=parallel.pp, vpp=parallel.vpp, pp_rank=pp_rank),
            dense=dense, expert=expert, has_embedding=pp_rank == 0,
            has_output_layer=pp_rank == parallel.pp - 1 and (not model.tie_embeddings or parallel.pp > 1),
        ))
    return stages
