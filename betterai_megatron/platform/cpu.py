"""Run the real megatron-core code on CPU (gloo backend); a no-op when CUDA is present.

megatron-core 0.16.1 has no CPU path: it names ``"cuda"`` devices, calls ``torch.cuda.*`` for streams, RNG and
memory, and compares ``param.type()`` with CUDA type names. This module is the one place that bridges those
calls so that the *same* megatron-core code (schedules, DDP, distributed optimizer, dist_checkpointing, MoE)
runs on a CPU box, which is how users debug a parallel layout before spending GPU hours.

What it does, and why each piece is needed (all verified on megatron-core 0.16.1 / torch 2.13 CPU):

* A ``TorchFunctionMode`` maps CUDA device arguments (``device="cuda"``, ``torch.device("cuda", i)``,
  ``.to("cuda")``) to CPU, makes ``Tensor.cuda()`` the identity and makes ``Tensor.type()`` report CUDA type
  names (the optimizers check ``param.type() == 'torch.cuda.FloatTensor'``).
* ``torch.cuda.{current_device, device_count, synchronize, manual_seed(_all), get_rng_state, set_rng_state,
  current_stream, default_stream, Stream, Event, stream, empty_cache, memory_*}`` get CPU stand-ins. The RNG
  functions use the CPU default generator, so megatron's TP RNG tracker forks the CPU generator and dropout
  inside tensor-parallel regions keeps its meaning.
* ``megatron.core.tensor_parallel.random._{get,set}_cuda_rng_state`` would otherwise queue the state change with
  ``torch.cuda._lazy_call`` forever (CUDA never initialises): they are pointed at the CPU generator.
* ``megatron.core.transformer.moe.moe_utils.te_general_gemm`` is referenced even without Transformer Engine
  (upstream bug in 0.16.1: ``NameError`` in the router): it is defined as ``None`` when TE is absent.
* The MoE all-to-all dispatcher converts its split sizes to numpy only for CUDA tensors; gloo's
  ``all_to_all_single`` rejects tensors, so CPU tensors are converted too.

Call :func:`enable_cpu_execution` once per process, before megatron-core builds anything. It is idempotent and
returns ``False`` (doing nothing) when CUDA is available.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _to_cpu_device(value):
    """Map a CUDA device spec (str, int-free torch.device) to CPU; leave everything else alone."""
    if isinstance(value, torch.device):
        return torch.device("cpu") if value.type == "cuda" else value
    if isinstance(value, str) and value.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cpu")  # a bare index is a CUDA ordinal (torch.cuda.current_device())
    return value


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """``torch.autograd.backward`` without torch-function dispatch (megatron's ``custom_backward`` does the same),
    so that it can run with the CPU bridge active."""
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    if grad_tensors is None:
        grad_tensors = tuple(torch.ones_like(t) if t.numel() == 1 else None for t in tensors)
    elif isinstance(grad_tensors, torch.Tensor):
        grad_tensors = (grad_tensors,)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs or ())
    torch.autograd.Variable._execution_engine.run_backward(
        tensors, tuple(grad_tensors), create_graph if retain_graph is None else retain_graph, create_graph, inputs,
        allow_unreachable=True, accumulate_grad=True)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch function call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # The mode is switched off while its handler runs; the backward pass of megatron's autograd functions
            # allocates on "cuda" too, so run the engine with the mode switched back on.
            if func is torch.Tensor.backward:
                tensor, rest = args[0], args[1:]
                names = ("gradient", "retain_graph", "create_graph", "inputs")
                call = dict(zip(names, rest), **kwargs)
                call = {"grad_tensors" if k == "gradient" else k: v for k, v in call.items()}
                with self:
                    return _run_backward(tensor, **call)
            call = dict(zip(("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs"),
                            args), **kwargs)
            call.pop("grad_variables", None)
            with self:
                return _run_backward(**call)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
            return func(*args)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs an accelerator (megatron's CP RoPE slicing asks for it)
        if func is torch.Tensor.to:
            # positional forms: to(device), to(device, dtype), to(dtype), to(other)
            args = (args[0],) + tuple(_to_cpu_device(a) if not isinstance(a, torch.dtype) else a for a in args[1:2]) + tuple(args[2:])
        elif func is torch.Tensor.is_pinned or func is torch.Tensor.pin_memory:
            return args[0] if func is torch.Tensor.pin_memory else False
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, so every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event`` with wall-clock ``elapsed_time`` in milliseconds."""

    def __init__(self, *args, enable_timing: bool = False, **kwargs):
        self._time = None

    def record(self, stream=None):
        import time

        self._time = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end._time - self._time) * 1000.0


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=None, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    stream = _CpuStream()
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly, never recurse.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.current_stream = lambda device=None: stream
    cuda.default_stream = lambda device=None: stream
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.stream = lambda s=None: contextlib.nullcontext(s)
    cuda.device = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.memory_stats = lambda device=None: {}
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state

    # On CPU the "CUDA" generator *is* the CPU generator, so megatron's check that forking the model-parallel
    # RNG leaves the CPU generator untouched always fires; it carries no information here.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # The all-to-all token dispatcher turns its split sizes into numpy only for CUDA tensors ("move to CPU");
    # gloo's all_to_all_single rejects tensors as split sizes, so convert CPU tensors as well.
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_tensor_to_cpu
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = move_tensor_to_cpu
    _patch_uneven_collectives()


def _patch_uneven_collectives() -> None:
    """Sequence-parallel MoE gathers/scatters tokens in *uneven* per-rank pieces (``output_split_sizes``) with
    list-based ``all_gather`` and ``reduce_scatter``, which gloo does not support (it needs equal sizes, and has
    no reduce-scatter). Same results through gloo-supported collectives: pad to the largest piece and gather;
    all-reduce then keep this rank's piece."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(size) for size in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)], dim=0)

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        world = group.size()
        if world == 1:
            return input_
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        rank = dist.get_rank(group)
        if input_split_sizes is None:
            size = input_.shape[0] // world
            return total[rank * size : (rank + 1) * size].contiguous()
        sizes = [int(size) for size in input_split_sizes]
        start = sum(sizes[:rank])
        return total[start : start + sizes[rank]].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def cpu_execution_enabled() -> bool:
    """Whether this process runs megatron-core through the CPU bridge."""
    return _ENABLED


def enable_cpu_execution() -> bool:
    """Install the CPU bridge once per process. Returns True if it is active, False when CUDA is available."""
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    logger.debug("megatron-core CPU execution bridge enabled")
    return True
