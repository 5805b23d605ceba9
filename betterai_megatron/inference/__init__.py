"""Batched autoregressive generation on megatron-core models: KV cache + recurrent state, sampling, log-probs.

Entry points: :class:`GenerationEngine` (one model replica; tp>1 inside), :func:`generate_data_parallel`
(dp>1 across replicas), :class:`GenerationConfig` / :class:`SamplingParams` (the ``generation`` config section),
:class:`GenerationResult`. ``betterai generate`` is ``generate_command.py``.
"""

from betterai_megatron.inference.config import GenerationConfig, SamplingParams
from betterai_megatron.inference.outputs import GenerationResult, GenerationStats

__all__ = ["GenerationConfig", "GenerationEngine", "GenerationResult", "GenerationStats", "SamplingParams",
           "generate_data_parallel"]


def __getattr__(name):
    # The engine imports megatron-core (seconds); load it only when asked for.
    if name == "GenerationEngine":
        from betterai_megatron.inference.engine import GenerationEngine

        return GenerationEngine
    if name == "generate_data_parallel":
        from betterai_megatron.inference.data_parallel import generate_data_parallel

        return generate_data_parallel
    raise AttributeError(name)
