"""Configuration of the generation engine: the ``generation`` section of the YAML tree.

Two plain dataclasses, checked on construction (errors name the dotted key):

* :class:`SamplingParams` -- how tokens are chosen (temperature, top-k, top-p, stops, budget, seed). It can also
  be built per call, e.g. GRPO rollouts and HumanEval use different temperatures with the same engine.
* :class:`GenerationConfig` -- how the engine runs (batch size, KV cache on/off, dropping finished rows, prefix
  sharing) and the default :class:`SamplingParams` under ``generation.sampling``.

YAML shape::

    generation:
      max_batch_size: 8
      use_kv_cache: true
      sampling: {temperature: 0.8, top_p: 0.95, top_k: 0, max_new_tokens: 512, stop_strings: ["\\ndef "], seed: 1234}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How the next token is chosen at each step.

    ``temperature == 0`` means greedy decoding (argmax; ``top_k``/``top_p``/``seed`` are then irrelevant).
    Otherwise the logits are divided by ``temperature``, then restricted to the ``top_k`` most likely tokens
    (``0`` = no limit), then to the smallest set of most likely tokens whose probability (renormalised after
    top-k) reaches ``top_p`` (``1.0`` = no limit), and one token is drawn from what is left.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Generation of a row ends once its detokenised output contains one of these; the output text is cut
    # just before the stop string (the token that completed it is kept in ``tokens``).
    stop_strings: list[str] = field(default_factory=list)
    # End a row when it samples the tokenizer's end-of-document token (kept in ``tokens``, not in ``text``).
    stop_at_eod: bool = True
    # Seeds the per-row torch.Generators; row i of a call uses a generator derived from (seed, prompt index),
    # so results do not depend on batch composition, batch size, data-parallel size or the global RNG.
    seed: int = 1234

    def __post_init__(self) -> None:
        prefix = "generation.sampling"
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{prefix}.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"{prefix}.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"{prefix}.top_k must be an int >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{prefix}.top_p must be in (0, 1] (1 = no limit), got {self.top_p!r}")
        self.stop_strings = list(self.stop_strings)
        for i, stop in enumerate(self.stop_strings):
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"{prefix}.stop_strings[{i}] must be a non-empty string, got {stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class GenerationConfig:
    """How the engine runs; ``sampling`` holds the default :class:`SamplingParams`."""

    # Rows decoded together. Prompts beyond this are processed in further batches (grouped by prompt length,
    # which minimises the steps where longer prompts are force-fed; see engine.py).
    max_batch_size: int = 8
    # False: recompute the whole prefix at every step (no cache). The reference for tests and the benchmark.
    use_kv_cache: bool = True
    # Remove finished rows from the active batch (and from the KV cache / recurrent states). Only turned off
    # to measure what it saves.
    drop_finished_rows: bool = True
    # Rows of a batch that share a prompt prefix (equal prompts, continuations of one trajectory prefix) compute
    # it once and fork the cached state where their tokens diverge (context.py ``fork_rows``). Same tokens and
    # log-probs as without; False only to measure what it saves. Needs use_kv_cache.
    share_prompt_prefixes: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"generation.max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if isinstance(self.sampling, dict):  # built from plain data outside the YAML loader
            self.sampling = SamplingParams(**self.sampling)
