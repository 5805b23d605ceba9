"""Build this rank's megatron-core ``GPTModel`` chunk(s) from the config.

One chunk per virtual pipeline stage (a single chunk without interleaving). Chooses Transformer Engine layers
when TE imports on CUDA (``model.transformer_impl=auto``), megatron-core's local torch layers otherwise, and
applies the layout-invariant initialisation unless ``model.init=megatron``.
"""

from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from betterai_megatron.config.model import ModelConfig
from betterai_megatron.config.parallel import ParallelConfig
from betterai_megatron.model.layout_invariant_init import initialize_layout_invariant
from betterai_megatron.model.specs import decoder_block_spec
from betterai_megatron.model.transformer_config import build_transformer_config

logger = logging.getLogger(__name__)


def use_transformer_engine(model: ModelConfig) -> bool:
    """TE layers when asked for, or (auto) when TE imports and CUDA is available."""
    if model.transformer_impl == "local":
        return False
    if model.transformer_impl == "transformer_engine":
        return True
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def build_model_chunks(
    *, model: ModelConfig, parallel: ParallelConfig, seq_length: int, seed: int
) -> tuple[list[GPTModel], TransformerConfig]:
    """This rank's model chunks (after ``parallel_state`` is initialised) and their TransformerConfig."""
    te = use_transformer_engine(model)
    config = build_transformer_config(model=model, parallel=parallel, seq_length=seq_length,
                                      use_transformer_engine=te)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        block_spec = decoder_block_spec(model=model, parallel=parallel, config=config,
                                        use_transformer_engine=te, vp_stage=vp_stage)
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=model.padded_vocab_size(parallel.tp),
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=model.position_embedding,
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    if model.init == "layout_invariant":
        initialize_layout_invariant(
            chunks,
            seed=seed,
            std=model.init_method_std,
            num_layers=model.num_layers,
            tied_output=model.tie_embeddings,
            gated_linear_unit=config.gated_linear_unit,
            experts_per_rank=(model.moe.num_experts // parallel.ep) if model.is_moe else 0,
        )
    logger.debug("built %d model chunk(s) with %s layers", len(chunks), "TE" if te else "local")
    return chunks, config
