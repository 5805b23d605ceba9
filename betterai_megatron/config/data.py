"""Data section (``data.*``): where training tokens come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    mock: bool = False  # megatron-core's MockGPTDataset (synthetic tokens), for layout debugging
    # indexed datasets: a list of prefixes, optionally weighted: ["0.7", "a_text_document", "0.3", "b_..."]
    blend: Optional[list[str]] = None
    split: str = "969,30,1"
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    languages: Optional[list[str]] = None
    num_workers: int = 0
    cache_dir: Optional[str] = None
