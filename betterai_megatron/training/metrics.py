"""Where a run reports progress: ``<run.dir>/metrics.jsonl``, TensorBoard, and a Megatron-style console line.

Only global rank 0 writes. TensorBoard keys follow Megatron-LM's names (``lm loss``, ``learning-rate``,
``grad-norm``, ``batch-size``, ...), so existing dashboards keep working.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

_TENSORBOARD_NAMES = {
    "loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "batch_size": "batch-size",
    "tokens_per_s": "throughput/tokens-per-second",
    "step_time_s": "iteration-time",
    "tflops_per_device": "throughput/tflops-per-device",
    "mfu": "throughput/mfu",
    "skipped_steps": "skipped-iterations",
    "val_loss": "validation lm loss",
    "memory_gb": "memory/max-allocated-gb",
}


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
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
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(_TENSORBOARD_NAMES.get(key, key), value, step)

    def console(self, record: dict) -> None:
        """A Megatron-style line: iteration, elapsed, ETA, lr, loss, grad norm, throughput."""
        if not self.enabled:
            return
        step = record["step"]
        elapsed = time.time() - self.start_time
        done = max(step - record.get("first_step", 0), 1)
        eta = elapsed / done * max(self.total_steps - step, 0)
        parts = [
            f" iteration {step:>8d}/{self.total_steps:>8d}",
            f"elapsed {_hms(elapsed)}",
            f"ETA {_hms(eta)}",
            f"elapsed time per iteration (ms): {record.get('step_time_s', 0.0) * 1000:.1f}",
            f"learning rate: {record.get('lr', 0.0):.6E}",
            f"global batch size: {record.get('batch_size', 0):5d}",
            f"lm loss: {record.get('loss', float('nan')):.6E}",
            f"grad norm: {record.get('grad_norm', float('nan')):.4f}",
            f"tokens/s: {record.get('tokens_per_s', 0.0):.0f}",
        ]
        if record.get("tflops_per_device"):
            parts.append(f"TFLOP/s/device: {record['tflops_per_device']:.2f}")
        if record.get("skipped_steps"):
            parts.append(f"skipped: {record['skipped_steps']}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
