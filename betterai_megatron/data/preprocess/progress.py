"""Progress reporting for preprocessing: documents/s, tokens/s and MB/s.

Owns :class:`Progress`. On a terminal it redraws one line (bar, percent of input bytes, rates, ETA) at most
five times a second; otherwise (logs, CI) it prints a line every ``log_interval`` documents, like Megatron-LM's
``Processed N documents (x docs/s, y MB/s).``. Hand-written: ~60 lines, and tqdm's line has no place for three
rates without custom formatting anyway.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.2


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.1f} "


class Progress:
    """Counts and reports; ``update`` is called once per batch from the main process."""

    def __init__(self, *, total_bytes: int, live: bool, log_interval: int, stream: TextIO | None = None) -> None:
        self.total_bytes = total_bytes
        self.live = live
        self.log_interval = log_interval
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.documents = 0
        self.tokens = 0
        self.input_bytes = 0
        self._next_log = log_interval
        self._last_draw = 0.0

    def rates(self) -> tuple[float, float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.documents / elapsed, self.tokens / elapsed, self.input_bytes / elapsed / 1e6

    def line(self) -> str:
        docs_per_s, tokens_per_s, mb_per_s = self.rates()
        text = (f"{self.documents} docs, {_si(self.tokens)}tokens | {docs_per_s:,.0f} docs/s, "
                f"{_si(tokens_per_s)}tokens/s, {mb_per_s:.2f} MB/s")
        if self.total_bytes:
            fraction = min(self.input_bytes / self.total_bytes, 1.0)
            filled = int(fraction * 24)
            eta = (self.total_bytes - self.input_bytes) / (mb_per_s * 1e6) if mb_per_s > 0 else 0.0
            text = f"[{'#' * filled}{'.' * (24 - filled)}] {fraction:6.1%} {text}, ETA {eta:.0f}s"
        return text

    def update(self, *, documents: int, tokens: int, input_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.input_bytes += input_bytes
        if self.live:
            now = time.perf_counter()
            if now - self._last_draw >= REDRAW_SECONDS:
                self._last_draw = now
                self.stream.write("\r" + self.line() + "\033[K")
                self.stream.flush()
        elif self.documents >= self._next_log:
            self._next_log = (self.documents // self.log_interval + 1) * self.log_interval
            print(f"Processed {self.line()}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.live:
            self.stream.write("\r" + self.line() + "\033[K\n")
            self.stream.flush()
