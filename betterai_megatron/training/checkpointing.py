"""Save and resume training with megatron-core ``dist_checkpointing`` (torch_dist backend), Megatron-LM style.

What a checkpoint holds (``iter_N/``, layout on disk in :mod:`checkpoint_files`):

* ``model`` (or ``model0``, ``model1``, ... with virtual pipeline stages, as Megatron-LM names them): each chunk's
  ``sharded_state_dict``. Tensor keys are *global* (global layer numbers, global expert ids, full tensor shapes),
  so a checkpoint loads into any tp/pp/vpp/ep layout: dist_checkpointing reshards on load.
* ``optimizer``: the megatron optimizer's ``sharded_state_dict``. The plain optimizer's state is per parameter
  (keyed like the parameters), so it reshards across every layout change; chained optimizers (dense + expert)
  do not prefix their keys. The distributed optimizer uses megatron-core's ``dp_reshardable`` format (fully
  parallel, reshards across data parallelism only) or, with ``checkpoint.fully_reshardable_optimizer``,
  ``fully_reshardable`` (gathered per data-parallel group while saving, reshards across everything).
  ``fully_sharded_model_space`` is not offered: megatron-core 0.16.1 deprecated it and its save raises
  "ShardedTensor.flattened_range is not supported". A change that the saved format cannot follow (also: plain
  <-> distributed optimizer, or a different number of chained optimizers, as MoE at ep=1 vs ep>1 builds) stops
  with a message naming ``checkpoint.load_optimizer=false`` (weights, schedule, step, fresh optimizer moments).
  Two megatron-core 0.16.1 gaps with torch's Adam (no Apex/TE, e.g. on CPU) are bridged here: a distributed
  optimizer that has not stepped cannot build its load state dict, and its ``dp_reshardable`` load resets
  Adam's step (:func:`prime_distributed_optimizer_state`, :func:`restore_distributed_optimizer_steps`);
  loading ``fully_reshardable`` there still fails upstream (KeyError 'step'), reported as such.
* ``opt_param_scheduler``: ``OptimizerParamScheduler.state_dict()``.
* ``rng_state``: every rank's python / numpy / torch CPU (and CUDA) generator states and megatron's
  tensor-parallel RNG tracker states (``model-parallel-rng``, ``expert-parallel-rng``, ...), one
  ``ShardedObject`` per (pp, tp, dp*cp) coordinate. Unlike Megatron-LM's default (one state per (pp, tp),
  replicated over dp), every data-parallel rank keeps its own: expert-parallel ranks live inside dp and their
  expert RNG streams differ. The states only mean something at the same layout, so they are restored only when
  the layout is unchanged.
* ``training_state`` (step, consumed_samples, skip counters) and ``layout`` in the common (rank-0) part.

Saves are committed by the tracker file after all ranks finished (synchronously, or in the finalisation of
dist_checkpointing's async request, checked without blocking at every step boundary and blocking before the
next save and at exit). Resume order: ``checkpoint.dir``'s own tracker (a preempted run resumes itself, also in
a later stage), else ``checkpoint.load_dir`` (full state, or model weights only with
``checkpoint.load_weights_only``: fresh optimiser, schedule and step 0 for the next stage), else a fresh start.

Hand-written only where megatron-core stops: megatron-core provides the sharded state dicts, the torch_dist
format, resharding, the fully-parallel save wrapper and the async queue; Megatron-LM's ``checkpointing.py``
(which glues them together) lives in ``megatron.training``, which the house rules keep us from importing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.serialization import (
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)

from betterai_megatron.config.parallel import ParallelConfig
from betterai_megatron.config.train import CheckpointConfig
from betterai_megatron.training import checkpoint_files as files
from betterai_megatron.training import fault_injection

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TRAINING_STATE_KEYS = ("step", "consumed_samples", "skipped_steps", "consecutive_skips")

# How the sharded state dicts are built; saved with the checkpoint (``content_metadata``) and reused on load, so
# a checkpoint is read in the format it was written in.
def sharded_state_metadata(checkpoint: CheckpointConfig, *, distributed_optimizer: bool) -> dict:
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed_optimizer:
        # only then: its presence makes chained optimizers prefix their keys ("chained_0."), and the number of
        # chained optimizers (dense, experts) depends on the layout — the plain optimizer stays unprefixed
        metadata["distrib_optim_sharding_type"] = ("fully_reshardable" if checkpoint.fully_reshardable_optimizer
                                                   else "dp_reshardable")
    return metadata


# Layout fields other than data parallelism: the plain optimizer's state reshards across all of them, the
# distributed optimizer's "dp_reshardable" format across none.
_MODEL_PARALLEL_KEYS = ("tp", "pp", "vpp", "cp", "ep", "etp")


def current_layout(parallel: ParallelConfig) -> dict:
    """The parallel layout as saved with a checkpoint (resharding happens when it differs on load)."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel.vpp if parallel.vpp and parallel.vpp > 1 else None,
        "cp": parallel_state.get_context_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "etp": parallel_state.get_expert_tensor_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "distributed_optimizer": parallel.distributed_optimizer,
        "world_size": dist.get_world_size(),
    }


def capture_rng_state() -> dict:
    """This rank's generator states (what Megatron-LM's ``get_rng_state`` collects)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():  # on the CPU bridge the "CUDA" generator *is* the CPU one
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def rng_sharded_object(state: dict | None) -> dist_checkpointing.ShardedObject:
    """One object per (pp, tp, dp*cp) rank: every rank saves (and later loads) its own states."""
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_data_parallel_world_size(with_context_parallel=True))
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank(with_context_parallel=True))
    return dist_checkpointing.ShardedObject("rng_state", state, shape, offset, replica_id=0)


def model_keys(num_chunks: int) -> list[str]:
    """``model`` for one chunk, ``model0..model{n-1}`` with virtual pipeline stages (Megatron-LM's keys)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def build_sharded_state_dict(*, chunks: list, optimizer=None, scheduler=None, training_state: dict | None = None,
                             layout: dict | None = None, rng: bool = False, is_loading: bool = False,
                             metadata: dict) -> dict:
    """The state dict handed to ``dist_checkpointing.save``/``load``; parts left as None are omitted."""
    metadata = dict(metadata)
    state_dict: dict = {"format_version": FORMAT_VERSION}
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        module = getattr(chunk, "module", chunk)  # megatron DDP wraps the GPTModel chunk
        state_dict[key] = module.sharded_state_dict(metadata=dict(metadata))  # megatron adds its dp_cp group
    if optimizer is not None:
        state_dict["optimizer"] = optimizer.sharded_state_dict(state_dict, is_loading=is_loading,
                                                               metadata=dict(metadata))
    if scheduler is not None:
        state_dict["opt_param_scheduler"] = scheduler.state_dict()
    if rng:
        state_dict["rng_state"] = rng_sharded_object(None if is_loading else capture_rng_state())
    if training_state is not None:
        state_dict["training_state"] = dict(training_state)
    if layout is not None:
        state_dict["layout"] = dict(layout)
    return state_dict


def start_checkpoint_results_queue() -> None:
    """Give dist_checkpointing's writer a results queue served by a *forked* manager process.

    megatron-core creates it lazily, at the first save, with a *spawned* ``multiprocessing.Manager``; the first
    write result put into it makes that fresh interpreter import torch to unpickle it, which stalls the first
    save of every run by the length of a torch import (measured 4-18 s on a loaded 2-core box; similar on a
    shared cluster file system). A forked manager already has torch imported, and dies with the trainer even on
    SIGKILL (megatron's spawned one is orphaned then). Private attribute, hence guarded:
    if megatron-core renames it, saves still work, only the first one is slower again.

    Idempotent. A stage that starts long-lived children with pipes (the sandbox server) calls it *before* starting
    them: the forked manager would otherwise inherit their pipe ends and keep them open (the sandbox's stdin then
    never reaches EOF and its shutdown waits for a timeout).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def _die_with_parent(parent_pid: int) -> None:
    """In the forked manager: end with the trainer, also when it is SIGKILLed (Linux ``PR_SET_PDEATHSIG``), and
    survive SIGTERM/SIGUSR1. torchrun delivers SIGTERM to each worker's whole process group (``os.killpg``), this
    manager included; the trainer answers it by finishing a checkpoint, whose writers report through this
    manager's queue — a manager killed by that same signal made the save fail with BrokenPipeError. It still ends
    with the trainer (normal shutdown, or the parent-death SIGKILL below)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the manager then outlives a killed trainer, as megatron's does
        pass
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(0)


def _chain(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prime_distributed_optimizer_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet the per-parameter state a step creates.

    megatron-core 0.16.1's ``DistributedOptimizer.state_dict()`` reads the inner torch optimizer's per-parameter
    ``step``, which ``torch.optim.Adam`` creates only at its first step (with Apex/TE's fused Adam the step lives
    in the param groups instead), so building the *load* state dict of a fresh distributed optimizer fails with
    a bare AssertionError. Zero moments and a zero step, as megatron's ``init_state_fn`` plus the first step
    would create them; the load then overwrites all of it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in _chain(optimizer):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(sub, DistributedOptimizer) or inner is None or len(inner.state) or sub.init_state_fn is None:
            continue
        sub.init_state_fn(inner, sub.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def restore_distributed_optimizer_steps(optimizer, loaded_state: dict) -> None:
    """Put the saved Adam step back into a distributed optimizer's torch Adam state after loading.

    megatron-core 0.16.1 gets torch Adam's per-parameter ``step`` wrong on load in two ways: it copies it from
    the loaded ``dp_reshardable`` buffers, which do not carry it (it comes back as whatever the state held
    before the load, 0 after :func:`prime_distributed_optimizer_state`), and before that it gives every
    parameter the *same* step tensor, which torch's Adam increments once per parameter per step. Either way
    Adam's bias correction is off and the resumed run drifts by ~1e-3 within a step. The saved value is in the
    common part (``param_groups[*]["step"]``), where megatron-core itself reads it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = _chain(optimizer)
    states = [loaded_state] if len(chain) == 1 else [loaded_state[i] for i in sorted(loaded_state)]
    for sub, state in zip(chain, states):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(sub, DistributedOptimizer) or inner is None or not isinstance(state, dict):
            continue
        steps = {group["step"] for group in state.get("optimizer", {}).get("param_groups", []) if "step" in group}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in inner.state.values():
            if "step" in param_state and torch.is_tensor(param_state["step"]):
                # one tensor per parameter: megatron hands torch the *same* step tensor for every parameter,
                # which torch's Adam then increments once per parameter at every step
                old = param_state["step"]
                param_state["step"] = torch.full_like(old, step)


@dataclass
class LoadedCheckpoint:
    """What :meth:`Checkpointer.load` restored."""

    path: Path
    training_state: dict  # zeros for a weights-only load
    weights_only: bool
    layout_changed: bool
    rng_restored: bool
    optimizer_restored: bool


class Checkpointer:
    """Saves ``iter_N/`` checkpoints into ``checkpoint.dir`` and resumes from it (see the module docstring)."""

    def __init__(self, *, checkpoint: CheckpointConfig, run_dir: str | Path, parallel: ParallelConfig):
        self.config = checkpoint
        self.root = Path(checkpoint.dir) if checkpoint.dir else Path(run_dir) / "checkpoints"
        self.parallel = parallel
        self.layout = current_layout(parallel)
        self.metadata = sharded_state_metadata(checkpoint, distributed_optimizer=parallel.distributed_optimizer)
        self.rank = dist.get_rank()
        self.last_saved_step: int | None = None
        self._async_queue = AsyncCallsQueue() if checkpoint.async_save else None
        self._fully_parallel_group = parallel_state.get_data_parallel_group(with_context_parallel=True)

    # ----------------------------------------------------------------------------------------------- saving
    def save(self, *, chunks: list, optimizer, scheduler, training_state: dict) -> None:
        """Write ``iter_<step>/`` on every rank; the tracker moves to it once all ranks are done."""
        step = int(training_state["step"])
        if step == self.last_saved_step:
            return
        self.finalize(blocking=True)  # one save in flight at a time; its tracker update comes first
        path = files.iteration_dir(self.root, step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if files.remove_incomplete(self.root, step):
                logger.warning("removed %s left by a save that never completed", path)
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        start = time.perf_counter()
        start_checkpoint_results_queue()
        state_dict = build_sharded_state_dict(
            chunks=chunks, optimizer=optimizer, scheduler=scheduler, rng=True,
            training_state={k: training_state[k] for k in TRAINING_STATE_KEYS},
            layout={**self.layout, "chained_optimizers": len(_chain(optimizer))}, metadata=self.metadata)
        request = dist_checkpointing.save(
            state_dict, str(path), sharded_strategy=self._save_strategy(),
            async_sharded_save=self._async_queue is not None, content_metadata=dict(self.metadata))

        def commit() -> None:
            fault_injection.maybe_crash_in_save(step=step, rank=self.rank)
            self._commit(step, path, start)

        self.last_saved_step = step
        if request is None:
            commit()
        else:
            request.add_finalize_fn(commit)
            self._async_queue.schedule_async_request(request)
            if self.rank == 0:
                logger.info("checkpoint at step %d is being written asynchronously to %s", step, path)

    def _save_strategy(self):
        strategy = get_default_save_sharded_strategy("torch_dist")
        if self._fully_parallel_group is not None and self._fully_parallel_group.size() > 1:
            # data-parallel replicas split the writing of replicated tensors instead of dp rank 0 writing all
            strategy = FullyParallelSaveStrategyWrapper(strategy, self._fully_parallel_group)
        return strategy

    def _commit(self, step: int, path: Path, start: float) -> None:
        """Every rank finished writing ``path``: move the tracker, then drop checkpoints beyond keep_last."""
        dist.barrier()
        if self.rank == 0:
            files.write_tracker(self.root, step)
            removed = files.prune(self.root, latest=step, keep_last=self.config.keep_last)
            logger.info("saved checkpoint at step %d to %s (%.2f s)%s", step, path, time.perf_counter() - start,
                        f"; removed old steps {removed}" if removed else "")
        dist.barrier()

    def finalize(self, *, blocking: bool = False) -> None:
        """Commit finished async saves (non-blocking at step boundaries; blocking before a save and at exit)."""
        if self._async_queue is not None and self._async_queue.get_num_unfinalized_calls():
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self._async_queue is not None:
            self._async_queue.close()
            self._async_queue = None

    # ---------------------------------------------------------------------------------------------- loading
    def resume_source(self) -> tuple[Path, bool] | None:
        """(checkpoint directory, weights_only) to start from, or None for a fresh start."""
        if files.read_tracker(self.root) is not None:
            return self.root, False
        incomplete = files.incomplete_steps(self.root)
        if incomplete and self.rank == 0:
            logger.warning("%s holds %s but no %s: no save ever completed there; ignoring them", self.root,
                           [files.iteration_dir(self.root, s).name for s in incomplete], files.TRACKER_FILENAME)
        if self.config.load_dir:
            load_root = Path(self.config.load_dir)
            if files.read_tracker(load_root) is None:
                raise files.CheckpointError(f"checkpoint.load_dir={load_root}: no {files.TRACKER_FILENAME} there "
                                            "(not a checkpoint directory, or no save completed)")
            return load_root, self.config.load_weights_only
        return None

    def load(self, *, chunks: list, optimizer, scheduler) -> LoadedCheckpoint | None:
        """Restore from :meth:`resume_source`; None when there is nothing to resume."""
        source = self.resume_source()
        if source is None:
            return None
        root, weights_only = source
        tracked = files.read_tracker(root)
        path = files.checkpoint_path(root, tracked)
        ignored = files.incomplete_steps(root)
        if ignored and self.rank == 0:
            logger.warning("ignoring incomplete checkpoint(s) %s in %s (newer than %s, which names %s)",
                           ignored, root, files.TRACKER_FILENAME, tracked)
        common = dist_checkpointing.load_common_state_dict(str(path))
        saved_layout = common.get("layout") or {}
        layout_changed = _layout_key(saved_layout) != _layout_key(self.layout)
        metadata = {**self.metadata, **(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {})}
        if not weights_only and "training_state" not in common:
            raise files.CheckpointError(
                f"{path} has no training_state: not written by betterai_megatron (e.g. a Megatron-LM checkpoint); "
                "only its model weights can be used (checkpoint.load_dir=... checkpoint.load_weights_only=true)")
        load_optimizer = not weights_only and self.config.load_optimizer
        if load_optimizer:
            _check_optimizer_reshardable(path, saved_layout, {**self.layout, "chained_optimizers": len(_chain(
                optimizer))}, metadata)
            prime_distributed_optimizer_state(optimizer)
        restore_rng = not weights_only and not layout_changed
        state_dict = build_sharded_state_dict(
            chunks=chunks, optimizer=optimizer if load_optimizer else None, rng=restore_rng, is_loading=True,
            metadata=metadata)
        start = time.perf_counter()
        try:
            loaded = dist_checkpointing.load(state_dict, str(path))
        except Exception as exc:
            raise files.CheckpointError(
                f"cannot load {path} (saved with layout {saved_layout}, loading with {self.layout}"
                f"{', optimizer state included' if load_optimizer else ''}): {exc}. "
                + ("If only the optimizer state cannot be resharded for this layout change, set "
                   "checkpoint.load_optimizer=false to restore weights, schedule and step with a fresh optimizer."
                   if load_optimizer else "")) from exc
        for key, chunk in zip(model_keys(len(chunks)), chunks):
            getattr(chunk, "module", chunk).load_state_dict(loaded[key], strict=True)
        if load_optimizer:
            try:
                with torch.no_grad():  # the distributed optimizer copies into fp32 main params viewing leaves
                    optimizer.load_state_dict(loaded["optimizer"])
                    restore_distributed_optimizer_steps(optimizer, loaded["optimizer"])
            except Exception as exc:
                raise files.CheckpointError(
                    f"cannot restore the optimizer state of {path} ({_layout_change(saved_layout, self.layout)}): "
                    f"{exc!r}; set checkpoint.load_optimizer=false to resume weights, schedule, step and data "
                    "position with fresh optimizer moments") from exc
        else:
            optimizer.reload_model_params()  # mixed precision: main (fp32) params from the loaded weights
        if not weights_only:
            scheduler.load_state_dict(common["opt_param_scheduler"])
        if restore_rng:
            restore_rng_state(loaded["rng_state"])
        training_state = ({k: 0 for k in TRAINING_STATE_KEYS} if weights_only
                          else {k: int(common["training_state"][k]) for k in TRAINING_STATE_KEYS})
        result = LoadedCheckpoint(path=path, training_state=training_state, weights_only=weights_only,
                                  layout_changed=layout_changed, rng_restored=restore_rng,
                                  optimizer_restored=load_optimizer)
        if self.rank == 0:
            _log_loaded(result, saved_layout=saved_layout, layout=self.layout, seconds=time.perf_counter() - start)
        if not weights_only and root == self.root:
            self.last_saved_step = training_state["step"]
        return result


def _check_optimizer_reshardable(path: Path, saved: dict, now: dict, metadata: dict) -> None:
    """Fail before loading when megatron-core cannot map the saved optimizer state onto this layout."""
    fix = ("set checkpoint.load_optimizer=false to resume weights, schedule, step and data position with fresh "
           "optimizer moments")
    if saved.get("distributed_optimizer", False) != now["distributed_optimizer"]:
        raise files.CheckpointError(
            f"{path}: optimizer state saved with parallel.distributed_optimizer={saved.get('distributed_optimizer')}"
            f" cannot be loaded with parallel.distributed_optimizer={now['distributed_optimizer']}; {fix}")
    if saved.get("chained_optimizers", now["chained_optimizers"]) != now["chained_optimizers"]:
        # e.g. MoE at ep=1 vs ep>1: megatron-core builds one optimizer, or one for dense and one for expert
        # parameters, and a chained optimizer's state does not load into another chain
        raise files.CheckpointError(
            f"{path}: the optimizer state was saved by {saved['chained_optimizers']} chained optimizer(s) and this "
            f"layout builds {now['chained_optimizers']} ({_layout_change(saved, now)}); {fix}")
    changed = any(saved.get(k) != now.get(k) for k in _MODEL_PARALLEL_KEYS)
    if now["distributed_optimizer"] and changed and metadata.get("distrib_optim_sharding_type") == "dp_reshardable":
        raise files.CheckpointError(
            f"{path}: the distributed optimizer's state was saved in megatron-core's dp_reshardable format, which "
            f"reshards across data parallelism only, and the layout changed ({_layout_change(saved, now)}); {fix} "
            "(save with checkpoint.fully_reshardable_optimizer=true to make the next checkpoints reshardable)")


def _layout_change(saved: dict, now: dict) -> str:
    return ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in _MODEL_PARALLEL_KEYS + ("dp",)
                     if saved.get(k) != now.get(k)) or "same layout"


def _layout_key(layout: dict) -> tuple:
    """The layout fields that decide which rank holds which RNG stream."""
    return tuple(layout.get(k) for k in ("tp", "pp", "vpp", "cp", "ep", "etp", "dp"))


def _log_loaded(result: LoadedCheckpoint, *, saved_layout: dict, layout: dict, seconds: float) -> None:
    what = "model weights only (fresh optimizer and schedule, step 0)" if result.weights_only else (
        f"step {result.training_state['step']}, consumed_samples {result.training_state['consumed_samples']}")
    logger.info("loaded checkpoint %s: %s (%.2f s)", result.path, what, seconds)
    if result.layout_changed:
        changed = {k: (saved_layout.get(k), layout.get(k)) for k in layout if saved_layout.get(k) != layout.get(k)}
        logger.warning("checkpoint %s was saved with a different layout (saved -> now: %s): weights%s resharded by "
                       "dist_checkpointing; RNG states not restored (per-rank streams do not map across layouts)",
                       result.path, changed, " and optimizer state" if result.optimizer_restored else "")
    elif not result.optimizer_restored and not result.weights_only:
        logger.warning("checkpoint.load_optimizer=false: optimizer state not restored (fresh Adam moments)")
