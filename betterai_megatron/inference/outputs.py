"""What a generation call returns: one :class:`GenerationResult` per prompt, and :class:`GenerationStats` per call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["eod", "stop", "length"]


@dataclass
class GenerationResult:
    """The generation for one prompt.

    ``tokens`` are all sampled tokens, including the end-of-document token (finish_reason "eod") or the token
    that completed a stop string (finish_reason "stop"); ``log_probs[i]`` belongs to ``tokens[i]`` and is
    log pi(tokens[i] | prompt + tokens[:i]) under the model's unmodified next-token distribution (temperature 1,
    no top-k/top-p, full output vocabulary), i.e. what a policy-gradient loss needs -- not the probability under
    the sampling distribution. ``text`` is the detokenised ``tokens`` without the end-of-document token and cut
    just before the stop string.
    """

    prompt_index: int
    prompt_tokens: list[int]
    tokens: list[int]
    log_probs: list[float]
    text: str
    finish_reason: FinishReason
    stop_string: str | None = None
    # Prompt tokens the engine fed through the model for this row. A prefix shared with other rows of its batch
    # (forked KV cache / recurrent state, see context.py) is charged once, to the first of those rows, so the
    # sum over a call's results is the prompt compute of the call (without the cache: every step's refeed).
    prompt_tokens_computed: int = 0

    def to_json(self) -> dict:
        return {
            "prompt_index": self.prompt_index,
            "completion": self.text,
            "tokens": self.tokens,
            "log_probs": self.log_probs,
            "finish_reason": self.finish_reason,
            "stop_string": self.stop_string,
        }


@dataclass
class GenerationStats:
    """Timing of the last ``generate`` call: one entry per decoding step (the prefill is step 0 of each batch).

    ``step_positions[i]`` is the sequence position step i predicted (its input covered positions < that),
    ``step_batch_sizes[i]`` the rows computed in it, ``step_seconds[i]`` its wall time (forward + selection) and
    ``step_cpu_seconds[i]`` the CPU time of this process in it (on a CPU box shared with other jobs this is the
    steadier measure of work; on GPU it only counts the host side).
    """

    step_positions: list[int] = field(default_factory=list)
    step_batch_sizes: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    generated_tokens: int = 0
    prompt_tokens_computed: int = 0  # sum of the results' ``prompt_tokens_computed``
    total_seconds: float = 0.0
    total_cpu_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def computed_rows(self) -> int:
        """Sum over steps of the rows computed: with dropping of finished rows this shrinks."""
        return sum(self.step_batch_sizes)
