"""Tiny models and a character tokenizer for testing and benchmarking the generation engine (not for training).

* :func:`tiny_gpt_model` -- a megatron-core ``GPTModel`` from the local (no Transformer Engine) layer spec, one
  layer per letter of ``layer_pattern``: ``A`` softmax attention, ``D``/``L``/``G`` the DeltaNet / GLA / Gated
  DeltaNet mixers of ``betterai_megatron.model.linear_attention`` (a hybrid model, whose recurrent layers keep
  a constant-size state during generation).
* :class:`CharTokenizer` -- one token per character (newline and printable ASCII), id 0 = end of document.

The caller initialises torch.distributed and megatron's model-parallel state first (tests and benchmarks do).
"""

from __future__ import annotations

import copy

import torch


class CharTokenizer:
    """id 0 = EOD, then ``"\\n"`` and the 95 printable ASCII characters: ``vocab_size == 97``."""

    def __init__(self) -> None:
        self.chars = "\n" + "".join(chr(c) for c in range(32, 127))
        self.eod = 0
        self.vocab_size = len(self.chars) + 1
        self._ids = {c: i + 1 for i, c in enumerate(self.chars)}

    def tokenize(self, text: str) -> list[int]:
        return [self._ids[c] for c in text]

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(self.chars[t - 1] for t in token_ids if 0 < t <= len(self.chars))


def tiny_gpt_model(*, vocab_size: int = 128, hidden_size: int = 64, num_attention_heads: int = 4,
                   layer_pattern: str = "AA", max_sequence_length: int = 1024, seed: int = 1234,
                   init_method_std: float = 0.02, ffn_hidden_size: int | None = None):
    """A GPTModel with one layer per letter of ``layer_pattern`` (``A`` softmax attention, ``D``/``L``/``G`` linear).

    Weights depend only on ``seed`` (CPU initialisation of full master weights, then split), so tp=1 and tp=2
    models built with the same seed hold the same weights.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlockSubmodules,
    )

    if not layer_pattern or set(layer_pattern) - set("ADLG"):
        raise ValueError(f"layer_pattern must be a non-empty string of A, D, L, G; got {layer_pattern!r}")
    from megatron.core import parallel_state

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(
        num_layers=len(layer_pattern), hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
    )
    attention_layer = get_gpt_layer_local_spec()
    if set(layer_pattern) == {"A"}:
        spec = attention_layer
    else:
        from betterai_megatron.model.linear_attention import linear_attention_spec

        def layer_spec(letter: str):
            if letter == "A":
                return attention_layer
            layer = copy.deepcopy(attention_layer)
            layer.submodules.self_attention = linear_attention_spec(letter)
            return layer

        spec = TransformerBlockSubmodules(
            layer_specs=[layer_spec(c) for c in layer_pattern],
            layer_norm=LayerNormImpl,
        )
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                    max_sequence_length=max_sequence_length, position_embedding_type="rope")
