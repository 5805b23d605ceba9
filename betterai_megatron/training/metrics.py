"""Where a run reports progress: ``<run.dir>/metrics.jsonl``, TensorBoard, and a Megatron-style console line.

Only global rank 0 writes. TensorBoard keys follow Megatron-LM's names (``lm loss``, ``learning-rate``,
``grad-norm``, ``batch-size``, ``iteration-time``, ``throughput`` in TFLOP/s per GPU, ``mem-*-bytes``,
``lm loss validation``, and the ``... vs samples`` twins of loss, learning rate and batch size), so existing
dashboards keep working; tokens/s, MFU and skip counts are added under names of the same style.

Model FLOPs per step come from :func:`betterai_megatron.model.flops.flops_per_step` and the per-device peak from
``train.peak_tflops`` or :func:`betterai_megatron.model.flops.peak_tflops_for_device`; without that module the
TFLOP/s and MFU fields are simply absent. Memory is the CUDA caching allocator's statistics on GPUs and the
process's peak resident set size on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_TENSORBOARD_NAMES = {
    "loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "batch_size": "batch-size",
    "tokens_per_s": "tokens-per-second",
    "step_time_s": "iteration-time",
    "tflops_per_device": "throughput",  # Megatron-LM: model TFLOP/s per GPU
    "mfu": "mfu",
    "skipped_steps": "skipped-iterations",
    "consumed_samples": "consumed-samples",
    "val_loss": "lm loss validation",
    "mem_allocated_bytes": "mem-allocated-bytes",
    "mem_max_allocated_bytes": "mem-max-allocated-bytes",
    "mem_reserved_bytes": "mem-reserved-bytes",
    "mem_max_rss_bytes": "mem-max-rss-bytes",
}
_VS_SAMPLES = ("loss", "lr", "batch_size")  # Megatron-LM also plots these against consumed samples


def memory_fields() -> dict:
    """This process's memory: allocator statistics on CUDA, peak RSS on CPU (bytes)."""
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        return {"mem_allocated_bytes": stats.get("allocated_bytes.all.current", 0),
                "mem_max_allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
                "mem_reserved_bytes": stats.get("reserved_bytes.all.current", 0)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem_max_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}  # Linux reports KiB


def throughput_fields(*, step_time_s: float, tokens_per_step: int, flops_per_step: float | None,
                      world_size: int, peak_tflops: float | None) -> dict:
    """tokens/s for the whole job; model TFLOP/s per device and MFU when the FLOPs per step are known."""
    fields = {"tokens_per_s": tokens_per_step / step_time_s}
    if flops_per_step:
        tflops = flops_per_step / step_time_s / world_size / 1e12
        fields["tflops_per_device"] = tflops
        if peak_tflops:
            fields["mfu"] = tflops / peak_tflops
    return fields


class ThroughputEstimator:
    """Per-step throughput and memory fields for the metrics record (the constants are computed once)."""

    def __init__(self, *, tokens_per_step: int, flops_per_step: float | None, world_size: int,
                 peak_tflops: float | None):
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.world_size, self.peak_tflops = world_size, peak_tflops

    @classmethod
    def for_config(cls, config, *, world_size: int) -> ThroughputEstimator:
        """Model FLOPs (without recomputation, as MFU is defined) and the peak of this device for the params
        dtype; ``train.peak_tflops`` overrides the peak."""
        t = config.train
        flops, peak = None, t.peak_tflops
        try:
            from betterai_megatron.model import flops as model_flops
        except ImportError:  # the model-FLOPs module is optional: no TFLOP/s or MFU without it
            model_flops = None
        if model_flops is not None:
            flops = model_flops.flops_per_step(model=config.model, seq_length=t.seq_length,
                                               global_batch_size=t.global_batch_size)
            if peak is None:
                peak = model_flops.peak_tflops_for_device(model_flops.current_device_name(),
                                                          dtype=config.model.params_dtype)
        return cls(tokens_per_step=t.global_batch_size * t.seq_length, flops_per_step=flops,
                   world_size=world_size, peak_tflops=peak)

    def fields(self, step_time_s: float) -> dict:
        return {**throughput_fields(step_time_s=step_time_s, tokens_per_step=self.tokens_per_step,
                                    flops_per_step=self.flops_per_step, world_size=self.world_size,
                                    peak_tflops=self.peak_tflops),
                **memory_fields()}


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, total_steps: int,
                 first_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.first_step = first_step  # a resumed run's ETA counts only the steps it has done itself
        self.start_time = time.time()
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        """Write one record (must hold ``step``) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = record["step"]
            samples = record.get("consumed_samples")
            for key, value in record.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                name = _TENSORBOARD_NAMES.get(key, key)
                self._tb.add_scalar(name, value, step)
                if key in _VS_SAMPLES and samples is not None:
                    self._tb.add_scalar(f"{name} vs samples", value, samples)

    def console(self, record: dict) -> None:
        """A Megatron-style line: iteration, elapsed, ETA, lr, loss, grad norm, throughput."""
        if not self.enabled:
            return
        step = record["step"]
        elapsed = time.time() - self.start_time
        done = max(step - self.first_step, 1)
        eta = elapsed / done * max(self.total_steps - step, 0)
        grad_norm = record.get("grad_norm")
        parts = [
            f" iteration {step:>8d}/{self.total_steps:>8d}",
            f"consumed samples: {record.get('consumed_samples', 0):>10d}",
            f"elapsed {_hms(elapsed)}",
            f"ETA {_hms(eta)}",
            f"elapsed time per iteration (ms): {record.get('step_time_s', 0.0) * 1000:.1f}",
            f"learning rate: {record.get('lr', 0.0):.6E}",
            f"global batch size: {record.get('batch_size', 0):5d}",
            f"lm loss: {record.get('loss', float('nan')):.6E}",
            f"grad norm: {float('nan') if grad_norm is None else grad_norm:.4f}",
            f"tokens/s: {record.get('tokens_per_s', 0.0):.0f}",
        ]
        if record.get("tflops_per_device"):
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {record['tflops_per_device']:.2f}")
        if record.get("mfu"):
            parts.append(f"MFU: {100 * record['mfu']:.1f}%")
        memory = record.get("mem_max_allocated_bytes") or record.get("mem_max_rss_bytes")
        if memory:
            parts.append(f"memory(GiB): {memory / 2**30:.2f}")
        if record.get("skipped_steps"):
            parts.append(f"number of skipped iterations: {record['skipped_steps']}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
