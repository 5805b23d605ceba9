"""Layout-invariant weight initialisation: the same ``train.seed`` gives the same model at every parallel layout.

megatron-core's own initialisation depends on the layout (pipeline stages build different layers from the same
generator; SwiGLU's fused ``fc1`` is split per rank as ``[gate_shard; up_shard]`` so a full-then-split init
changes the function with tp; experts draw per rank). Debugging a layout on CPU means comparing it with a single
process, so each weight is instead defined by its *canonical* identity:

* a canonical name: global layer number instead of the stage-local index, global expert index instead of the
  rank-local one, and the tied output layer of the last stage named as the word embeddings;
* a canonical full tensor: element ``e`` of the tensor, laid out with its tensor-parallel partition dimension
  outermost, is the ``e``-th draw of a counter-based stream seeded by ``sha256(seed, canonical name)``.

Each rank draws only the elements of its own shard: PCG64 can ``advance`` to any position, and normals come from
Box-Muller on pairs of 53-bit uniforms, so the cost is O(local elements) at any model size. Weights with two or
more dimensions are drawn N(0, std) — std scaled by 1/sqrt(2 * num_layers) for output projections, as megatron
does; one-dimensional parameters (norm scales, biases) keep their constructor values. A parameter whose init is
not a normal (a convolution's uniform taps, Mamba-style decay constants) declares it with the attribute
``layout_invariant_init``: a function from canonical U(0, 1) draws (a float64 numpy array) to its values.

Hand-written because no library initialises sharded megatron parameters from a layout-free definition.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import torch
from megatron.core import parallel_state

_OUTPUT_PROJECTIONS = ("linear_proj", "linear_fc2", "out_proj")
_LAYER_RE = re.compile(r"^(?P<pre>(?:module\.)*decoder\.layers\.)(?P<idx>\d+)\.(?P<rest>.*)$")
_EXPERT_RE = re.compile(r"local_experts\.(?P<idx>\d+)\.")
_GROUPED_EXPERT_RE = re.compile(r"(?P<stem>weight)(?P<idx>\d+)$")


def canonical_normal(seed_key: str, start: int, count: int) -> np.ndarray:
    """Standard normals at canonical positions ``[start, start + count)`` of the stream named ``seed_key``."""
    seed = int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:16], "little")
    first_pair, end_pair = start // 2, (start + count + 1) // 2
    bit_generator = np.random.PCG64(seed)
    bit_generator.advance(2 * first_pair)
    raw = bit_generator.random_raw(2 * (end_pair - first_pair))
    uniforms = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)
    radius = np.sqrt(-2.0 * np.log(uniforms[0::2]))
    angle = 2.0 * math.pi * uniforms[1::2]
    normals = np.empty(2 * (end_pair - first_pair), dtype=np.float64)
    normals[0::2] = radius * np.cos(angle)
    normals[1::2] = radius * np.sin(angle)
    offset = start - 2 * first_pair
    return normals[offset : offset + count]


def canonical_uniform(seed_key: str, start: int, count: int) -> np.ndarray:
    """U(0, 1) draws at canonical positions ``[start, start + count)`` of the stream named ``seed_key``."""
    seed = int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:16], "little")
    bit_generator = np.random.PCG64(seed)
    bit_generator.advance(start)
    return ((bit_generator.random_raw(count) >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)


INIT_ATTRIBUTE = "layout_invariant_init"


def _canonical_name(chunk: torch.nn.Module, name: str, *, tied_output: bool, experts_per_rank: int) -> str:
    if tied_output and name.endswith("output_layer.weight"):
        return "embedding.word_embeddings.weight"
    match = _LAYER_RE.match(name)
    if match:
        layer = chunk.decoder.layers[int(match["idx"])]
        name = f"decoder.layers.{layer.layer_number}.{match['rest']}"
        if "experts" in name:
            offset = parallel_state.get_expert_model_parallel_rank() * experts_per_rank
            name = _EXPERT_RE.sub(lambda m: f"experts.{int(m['idx']) + offset}.", name)
            name = _GROUPED_EXPERT_RE.sub(lambda m: f"{m['stem']}[{int(m['idx']) + offset}]", name)
    return name


def _shard_ranges(param: torch.Tensor, name: str, *, gated_fc1: bool) -> tuple[list[tuple[int, int]], int, int]:
    """Canonical ranges of partition-dim slices this rank holds: ([(first_slice, count), ...], dim, tp_size)."""
    dim = getattr(param, "partition_dim", 0) if getattr(param, "tensor_model_parallel", False) else 0
    local = param.shape[dim]
    if not getattr(param, "tensor_model_parallel", False):
        return [(0, local)], dim, 1
    if "experts" in name:
        rank, size = (parallel_state.get_expert_tensor_parallel_rank(),
                      parallel_state.get_expert_tensor_parallel_world_size())
    else:
        rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    if gated_fc1 and re.search(r"linear_fc1\.weight\d*$", name):
        half = local // 2  # local rows are [gate_shard; up_shard]; canonical rows are [gate_full; up_full]
        return [(rank * half, half), (size * half + rank * half, half)], dim, size
    return [(rank * local, local)], dim, size


@torch.no_grad()
def initialize_layout_invariant(chunks: list[torch.nn.Module], *, seed: int, std: float, num_layers: int,
                                tied_output: bool, gated_linear_unit: bool, experts_per_rank: int) -> None:
    """Overwrite every >=2-D parameter of the model chunks with its canonical values (see module docstring)."""
    output_std = std / math.sqrt(2.0 * num_layers)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            custom = getattr(param, INIT_ATTRIBUTE, None)
            if param.dim() < 2 and custom is None:
                continue
            canonical = _canonical_name(chunk, name, tied_output=tied_output, experts_per_rank=experts_per_rank)
            ranges, dim, _ = _shard_ranges(param, name, gated_fc1=gated_linear_unit)
            moved = param.movedim(dim, 0)
            slice_numel = moved[0].numel() if moved.dim() > 1 else 1
            draw = canonical_uniform if custom is not None else canonical_normal
            pieces = [draw(f"{seed}:{canonical}", first * slice_numel, count * slice_numel) for first, count in ranges]
            values = np.concatenate(pieces).reshape(moved.shape)
            if custom is not None:
                values = custom(values)
            else:
                values = values * (output_std if any(p in canonical for p in _OUTPUT_PROJECTIONS) else std)
            tensor = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype=param.dtype)
            param.copy_(tensor.movedim(0, dim).to(param.device))
