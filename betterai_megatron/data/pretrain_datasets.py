"""Pretraining datasets from Megatron indexed ``.bin/.idx`` prefixes, and the ``data`` config section.

Owns :class:`DataConfig` (section ``data``; the SFT and preference sub-sections are defined beside their datasets)
and :func:`build_pretrain_datasets`, which goes through megatron-core's own machinery:
``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` + ``GPTDataset`` (blend of prefixes with weights,
train/valid/test split string such as ``"98,1,1"``, index caching, the C++ ``helpers_cpp`` sample index that
megatron-core 0.16.1 ships compiled), or ``MockGPTDataset`` when ``data.mock`` is true.

``data.languages`` keeps only documents of those languages. Preprocessing writes, beside each output prefix,
the sidecar files (the contract with ``tools/preprocess_data.py``; :func:`language_sidecar_paths`):

* ``{prefix}.lang.npy`` — a 1-D integer numpy array (int16/uint8), one language id per document of the
  ``.idx``;
* ``{prefix}.languages.json`` — ``{"<id>": "<name>", ...}`` (a plain list of names, index = id, is accepted too).

The split is taken over *all* documents first (megatron's contiguous document ranges) and the language filter is
applied inside each split, so a document stays in the same split whatever languages are chosen. The filter is a
:class:`CodeGPTDataset` — megatron's ``GPTDataset`` with its exposed document indices narrowed before the
document/sample/shuffle indices are built; ``languages`` is part of the cache key.

Sample (megatron ``GPTDataset``): ``tokens [s]``, ``labels [s]``, ``loss_mask [s]``, ``position_ids [s]``, and
``attention_mask [1, s, s]`` (True = masked) when ``create_attention_mask``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from betterai_megatron.data.preference_dataset import PreferenceDataConfig
from betterai_megatron.data.sft_dataset import SftDataConfig

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """``data``: where training tokens come from (``seq_length`` is ``train.seq_length``)."""

    mock: bool = False  # megatron-core's MockGPTDataset (synthetic tokens), for layout debugging
    prefixes: list[str] = field(default_factory=list)  # indexed dataset prefixes (path without .bin/.idx)
    weights: Optional[list[float]] = None  # blend weights, one per prefix (None: proportional to size)
    split: str = "969,30,1"  # train,valid,test weights over each prefix's documents
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    languages: Optional[list[str]] = None  # keep only these languages (needs the .lang.npy sidecars)
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: Optional[str] = None  # megatron's index cache (None: "{prefix}/cache/" beside the data)
    reset_position_ids: bool = False  # restart positions after each EOD
    reset_attention_mask: bool = False  # no attention across EOD (needs create_attention_mask)
    eod_mask_loss: bool = False  # no loss on EOD tokens
    create_attention_mask: bool = False  # return attention_mask [1, s, s]; local attention path, O(s^2)
    sft: SftDataConfig = field(default_factory=SftDataConfig)
    preference: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)


def check_data_config(config: DataConfig, *, require_prefixes: bool = True) -> list[str]:
    """Problems in ``data.*`` that need no files (each names its key); empty when fine. Stages that do not read
    indexed data (SFT, GRPO, eval) pass ``require_prefixes=False``."""
    problems = []
    if require_prefixes and not config.mock and not config.prefixes:
        problems.append("data.prefixes is empty: give indexed dataset prefixes, or set data.mock=true")
    if config.weights is not None:
        if len(config.weights) != len(config.prefixes):
            problems.append(f"data.weights has {len(config.weights)} entries for {len(config.prefixes)} "
                            "data.prefixes: give one weight per prefix")
        if any(not w > 0 for w in config.weights):
            problems.append(f"data.weights must all be positive, got {config.weights}")
    try:
        parse_split(config.split)
    except ValueError as exc:
        problems.append(str(exc))
    if config.languages is not None and (not config.languages or not all(
            isinstance(x, str) and x.strip() for x in config.languages)):
        problems.append(f"data.languages must be null or a non-empty list of names, got {config.languages}")
    if config.reset_attention_mask and not config.create_attention_mask:
        problems.append("data.reset_attention_mask needs data.create_attention_mask=true")
    if config.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0, got {config.num_workers}")
    return problems


def parse_split(split: str) -> list[float]:
    """``"98,1,1"`` -> ``[0.98, 0.01, 0.01]`` (one to three non-negative numbers, missing ones are 0)."""
    parts = [p.strip() for p in str(split).split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ValueError(f"data.split must look like '98,1,1' (up to three non-negative numbers), got {split!r}")
    values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if sum(values) <= 0:
        raise ValueError(f"data.split must not be all zeros, got {split!r}")
    return [v / sum(values) for v in values]


# ------------------------------------------------------------------------------------------------- languages

def language_sidecar_paths(prefix: str) -> tuple[Path, Path]:
    """``({prefix}.lang.npy, {prefix}.languages.json)`` — where preprocessing writes per-document languages."""
    return Path(f"{prefix}.lang.npy"), Path(f"{prefix}.languages.json")


def read_language_ids(prefix: str) -> tuple[np.ndarray, dict[int, str]]:
    """Per-document language ids ``[num_documents]`` and the id -> name table of one prefix."""
    ids_path, names_path = language_sidecar_paths(prefix)
    for path in (ids_path, names_path):
        if not path.exists():
            raise FileNotFoundError(f"data.languages needs {path} (written by tools/preprocess_data.py beside "
                                    f"the .bin/.idx); it is missing for prefix {prefix}")
    ids = np.load(ids_path, allow_pickle=False)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{ids_path}: expected a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    try:
        raw = json.loads(names_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{names_path}: not a readable JSON id -> name mapping: {exc}") from exc
    if isinstance(raw, list):
        names = dict(enumerate(raw))
    elif isinstance(raw, dict):
        try:
            names = {int(k): v for k, v in raw.items()}
        except ValueError as exc:
            raise ValueError(f"{names_path}: keys must be integer ids, got {list(raw)[:5]}") from exc
    else:
        raise ValueError(f"{names_path}: expected a mapping of id -> name, got {type(raw).__name__}")
    return ids, {k: str(v).lower() for k, v in names.items()}


def language_document_mask(prefix: str, languages: Sequence[str], *, num_documents: int) -> np.ndarray:
    """Boolean ``[num_documents]``: documents of ``prefix`` whose language is one of ``languages``."""
    ids, names = read_language_ids(prefix)
    ids_path = language_sidecar_paths(prefix)[0]
    if len(ids) != num_documents:
        raise ValueError(f"{ids_path} has {len(ids)} language ids but {prefix}.idx has {num_documents} documents")
    wanted = {x.strip().lower() for x in languages}
    known = set(names.values())
    if not wanted & known:
        raise ValueError(f"data.languages={sorted(wanted)}: none of them occur in {prefix} "
                         f"(its languages: {sorted(known)})")
    wanted_ids = np.array([i for i, name in names.items() if name in wanted], dtype=np.int64)
    return np.isin(ids.astype(np.int64), wanted_ids)


# ------------------------------------------------------------------------------------------ megatron datasets

class _MegatronTokenizerView:
    """What megatron-core's datasets read from a tokenizer: ``vocab_size``, ``eod``, ``pad`` and the JSON-able
    ``unique_identifiers`` that enter the index cache key (our tokenizer is duck-typed, not a
    ``MegatronTokenizerBase``)."""

    def __init__(self, tokenizer: Any, *, tokenizer_type: str, tokenizer_model: str | None) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = int(tokenizer.eod)
        pad = getattr(tokenizer, "pad", None)
        self.pad = int(pad) if pad is not None else -1
        self.unique_identifiers = OrderedDict(
            [("class", "BetterAITokenizer"), ("tokenizer_type", tokenizer_type),
             ("tokenizer_model", tokenizer_model), ("vocab_size", self.vocab_size), ("eod", self.eod)])


def _megatron_classes() -> dict[str, Any]:
    """Import megatron-core's dataset machinery lazily (importing megatron.core costs seconds)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import (
        GPTDataset,
        GPTDatasetConfig,
        MockGPTDataset,
    )

    return {"builder": BlendedMegatronDatasetBuilder, "GPTDataset": GPTDataset,
            "GPTDatasetConfig": GPTDatasetConfig, "MockGPTDataset": MockGPTDataset}


_CODE_CLASSES: dict[str, type] = {}


def _code_gpt_classes() -> tuple[type, type]:
    """``(CodeGPTDatasetConfig, CodeGPTDataset)``, defined on first use so that importing this module does not
    import megatron-core."""
    if _CODE_CLASSES:
        return _CODE_CLASSES["config"], _CODE_CLASSES["dataset"]
    classes = _megatron_classes()
    gpt_config_cls, gpt_dataset_cls = classes["GPTDatasetConfig"], classes["GPTDataset"]

    @dataclass
    class CodeGPTDatasetConfig(gpt_config_cls):
        """``GPTDatasetConfig`` plus the language choice (lower-case names; None keeps every document)."""

        languages: Optional[tuple] = None

    class CodeGPTDataset(gpt_dataset_cls):
        """megatron-core ``GPTDataset`` over the documents of the chosen languages within this split.

        Also refuses an empty split that was asked for samples (megatron-core would loop forever computing the
        number of epochs of a zero-token split).
        """

        def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
            if config.languages and indexed_indices is not None:
                document_bounds = np.asarray(indexed_dataset.document_indices)
                keep_documents = language_document_mask(dataset_path, config.languages,
                                                        num_documents=len(document_bounds) - 1)
                # GPTDataset indexes sequences; a document may hold several (preprocessing with sentence split)
                keep = np.repeat(keep_documents, np.diff(document_bounds))
                indexed_indices = indexed_indices[keep[indexed_indices]]
            if indexed_indices is not None and len(indexed_indices) == 0 and num_samples is not None:
                if num_samples > 0:
                    raise ValueError(
                        f"the {index_split.name} split of {dataset_path} has no documents"
                        f"{' in languages ' + str(list(config.languages)) if config.languages else ''} but "
                        f"{num_samples} samples were requested; change data.split or data.languages")
                num_samples = None  # an empty split, asked for nothing: one (empty) epoch
            super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)

        @staticmethod
        def _key_config_attributes() -> list[str]:
            return [*gpt_dataset_cls._key_config_attributes(), "languages"]

    # Module-level names (served by ``__getattr__`` below) so that pickling, e.g. into DataLoader workers
    # started with spawn, finds the classes.
    for cls in (CodeGPTDatasetConfig, CodeGPTDataset):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _CODE_CLASSES.update(config=CodeGPTDatasetConfig, dataset=CodeGPTDataset)
    return CodeGPTDatasetConfig, CodeGPTDataset


def __getattr__(name: str) -> Any:
    """``CodeGPTDatasetConfig`` and ``CodeGPTDataset`` exist once megatron-core is imported (PEP 562)."""
    if name in ("CodeGPTDatasetConfig", "CodeGPTDataset"):
        config_cls, dataset_cls = _code_gpt_classes()
        return config_cls if name == "CodeGPTDatasetConfig" else dataset_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_pretrain_datasets(*, data_config: DataConfig, tokenizer: Any, seq_length: int, seed: int,
                            train_samples: int, valid_samples: int, test_samples: int,
                            is_built_on_rank: Callable[[], bool] | None = None) -> tuple[Any, Any, Any]:
    """(train, valid, test) megatron-core datasets; an entry is None where the split is empty (weight 0).

    Args:
        data_config: the ``data`` section.
        tokenizer: the project tokenizer (``vocab_size``, ``eod``, ``pad``).
        seq_length: tokens per sample (``train.seq_length``).
        seed: seeds megatron's document/sample shuffles.
        train_samples, valid_samples, test_samples: samples each split must provide (more epochs are drawn when
            a split is smaller).
        is_built_on_rank: megatron's "build on this rank" callable (e.g. only TP rank 0 of the first and last
            pipeline stage); default: every rank builds. Under torch.distributed, rank 0 builds the index cache
            first and the others then read it (megatron-core's own barrier protocol), so call on all ranks.
    """
    problems = check_data_config(data_config)
    if problems:
        raise ValueError("; ".join(problems))
    classes = _megatron_classes()
    config_cls, dataset_cls = _code_gpt_classes()
    view = _MegatronTokenizerView(tokenizer, tokenizer_type=data_config.tokenizer_type,
                                  tokenizer_model=data_config.tokenizer_model)
    blend = None
    if not data_config.mock:
        for prefix in data_config.prefixes:
            for suffix in (".bin", ".idx"):
                if not Path(prefix + suffix).exists():
                    raise FileNotFoundError(f"data.prefixes: {prefix}{suffix} not found")
        blend = (list(data_config.prefixes),
                 None if data_config.weights is None else [float(w) for w in data_config.weights])
    languages = tuple(sorted({x.strip().lower() for x in data_config.languages})) if data_config.languages else None
    if languages and data_config.mock:
        raise ValueError("data.languages cannot be used with data.mock=true (mock data has no languages)")
    config = config_cls(
        random_seed=seed, sequence_length=seq_length, blend=blend,
        split=None if data_config.mock else data_config.split,
        path_to_cache=_cache_dir(data_config), tokenizer=view,
        reset_position_ids=data_config.reset_position_ids, reset_attention_mask=data_config.reset_attention_mask,
        eod_mask_loss=data_config.eod_mask_loss, create_attention_mask=data_config.create_attention_mask,
        languages=languages)
    cls = classes["MockGPTDataset"] if data_config.mock else dataset_cls
    builder = classes["builder"](cls, [train_samples, valid_samples, test_samples],
                                 is_built_on_rank or (lambda: True), config)
    train, valid, test = builder.build()
    return train, valid, test


def _cache_dir(data_config: DataConfig) -> str | None:
    """The index cache directory to hand to megatron-core.

    megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on a cache miss without
    checking that a process group exists, so a blend of several prefixes cannot use a cache directory in a
    process without torch.distributed (tools, notebooks, unit tests). There the cache is left to megatron's
    default: each prefix's indices beside the data (``{prefix}/cache/``), the small blend index in memory.
    """
    import torch.distributed as dist

    if data_config.cache_dir is None or data_config.mock or dist.is_initialized() or len(data_config.prefixes) < 2:
        return data_config.cache_dir
    logger.warning("data.cache_dir is ignored without torch.distributed for a blend of %d prefixes "
                   "(megatron-core's BlendedDataset needs a process group to cache); indices are cached "
                   "beside the data", len(data_config.prefixes))
    return None
