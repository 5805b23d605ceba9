"""SFT data: instruction/chat records -> conversations -> packed, loss-masked training sequences.

Owns (config section ``data.sft``, :class:`SftDataConfig`):

* reading records from jsonl (also ``.gz``), a JSON array, parquet, or a local directory (a ``datasets``
  ``save_to_disk`` directory, or a folder of such files, e.g. a downloaded hub snapshot) — :func:`iter_records`,
  every record tagged with its ``file:line`` (or ``file:row``) so bad input is reported where it is;
* the schemas of the named corpora — :func:`record_to_messages`:
  ``messages`` (Code-Feedback: ``[{role, content}]``), ``sharegpt`` (``conversations: [{from, value}]``),
  ``magicoder`` (Magicoder-OSS-Instruct: ``problem``/``solution``) and ``prompt_response`` (configurable fields;
  ``auto`` also recognises ``instruction``/``response`` of Magicoder-Evol-Instruct);
* :class:`PackedSftDataset`: conversations rendered with :class:`ChatTemplate` (loss on assistant tokens only),
  packed several per sequence of ``seq_length`` without attention across them (:mod:`.packing`), reshuffled
  deterministically each epoch; :func:`build_sft_datasets` makes the seeded train/validation split.

Sample (megatron conventions, ``s = seq_length``): ``tokens [s]``, ``labels [s]`` (shifted), ``loss_mask [s]``
float, ``position_ids [s]`` (restart per document), ``cu_seqlens [K]`` (-1 padded), and with
``create_attention_mask`` the boolean block-diagonal causal ``attention_mask [1, s, s]`` (True = masked) for the
local CPU attention path.

Hand-written readers (not ``datasets.load_dataset``) so that a malformed line is reported as ``file:line`` and no
HF cache is written; ``datasets`` is used for ``save_to_disk`` directories, ``pyarrow`` for parquet.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from betterai_megatron.data.chat_template import (
    ChatTemplate,
    ConversationError,
    conversation_from_prompt_response,
)
from betterai_megatron.data.packing import (
    block_causal_attention_mask,
    build_packed_sample,
    pack_best_fit_decreasing,
)

logger = logging.getLogger(__name__)

SftFormat = Literal["auto", "messages", "sharegpt", "magicoder", "prompt_response"]
_RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# (prompt, response) field pairs that ``auto`` recognises after the configured pair.
_KNOWN_PAIRS = (("problem", "solution"), ("instruction", "response"), ("instruction", "output"), ("query", "answer"))


@dataclass
class SftDataConfig:
    """``data.sft``: instruction data for the SFT stage."""

    paths: list[str] = field(default_factory=list)  # jsonl(.gz) / json / parquet files or local dataset dirs
    format: SftFormat = "auto"
    prompt_field: str = "prompt"  # for format=prompt_response (and tried first by auto)
    response_field: str = "response"
    system_field: Optional[str] = None  # a per-record system prompt field, if any
    system_prompt: Optional[str] = None  # default system turn when a conversation has none
    reasoning: bool = False  # the reasoning template (default system prompt asks for <think> + one code block)
    valid_fraction: float = 0.01  # of conversations, held out before packing
    overlong: Literal["truncate", "drop"] = "truncate"  # conversations longer than seq_length + 1 tokens
    skip_bad_records: bool = False  # False: the first bad record stops with file:line; True: log, count, skip
    create_attention_mask: bool = False  # add attention_mask [1, s, s] (local attention path; O(s^2) memory)
    # True: the SFT stage writes the built-in demo conversations to data.sft.paths (one .jsonl) and trains a
    # tokenizer on the built-in corpus to data.tokenizer_model when those files do not exist yet (no download;
    # betterai_megatron.training.sft.ensure_builtin_sft_data). For CPU demos such as examples/configs/tiny_sft.yaml.
    builtin_if_missing: bool = False


class RecordError(ValueError):
    """A record that cannot be used; ``str()`` starts with its ``file:line``."""


# --------------------------------------------------------------------------------------------------- reading

def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` from a file or a local dataset directory.

    ``location`` is ``file:line`` (jsonl), ``file:item N`` (JSON array) or ``file:row N`` (parquet / datasets,
    0-based rows). A line that is not valid UTF-8 or JSON yields ``(location, RecordError)`` instead of a record,
    so the caller decides whether to stop or skip; blank lines are skipped.
    """
    path = Path(path)
    if path.is_dir():
        yield from _iter_directory(path)
    elif not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    elif path.name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        yield from _iter_json(path)
    else:
        raise ValueError(f"{path}: unsupported data file; expected one of {_RECORD_SUFFIXES} or a dataset directory")


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        head = handle.read(1 << 16).lstrip()
        handle.seek(0)
        if path.name.endswith((".json", ".json.gz")) and head.startswith(b"["):
            try:
                items = json.loads(handle.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RecordError(f"{path}: not a valid JSON array: {exc}") from exc
            for index, item in enumerate(items):
                yield f"{path}:item {index}", item
            return
        for line_number, raw in enumerate(handle, start=1):
            location = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield location, RecordError(f"{location}: invalid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                yield location, RecordError(f"{location}: malformed JSON: {exc.msg} (column {exc.colno})")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


def _iter_directory(path: Path) -> Iterator[tuple[str, Any]]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise ValueError(f"{path}: a DatasetDict with splits {list(loaded)}; point to one split's directory")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        for row, record in enumerate(loaded):
            yield f"{path}:row {row}", record
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_RECORD_SUFFIXES))
    if not files:
        raise ValueError(f"{path}: no data files ({', '.join(_RECORD_SUFFIXES)}) and not a saved dataset")
    for file in files:
        yield from iter_records(file)


# --------------------------------------------------------------------------------------------------- schemas

def record_to_messages(record: Any, *, format: SftFormat = "auto", prompt_field: str = "prompt",
                       response_field: str = "response", system_field: str | None = None) -> list[dict[str, str]]:
    """Map one record of a supported schema to ``[{role, content}]`` turns. Raises ``KeyError``/``ValueError``
    naming the missing or bad key."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if format == "auto":
        format, prompt_field, response_field = _detect_format(record, prompt_field, response_field)
    system = _optional_str(record, system_field) if system_field else None
    if format == "messages":
        turns = _required(record, "messages")
        if not isinstance(turns, list):
            raise ValueError(f"key 'messages' must be a list of turns, got {type(turns).__name__}")
        messages = [{"role": t.get("role"), "content": t.get("content")} if isinstance(t, dict) else t for t in turns]
    elif format == "sharegpt":
        messages = [_sharegpt_turn(i, t) for i, t in enumerate(_required(record, "conversations"))]
    elif format == "magicoder":
        messages = conversation_from_prompt_response(_required_str(record, "problem"),
                                                     _required_str(record, "solution"))
    elif format == "prompt_response":
        messages = conversation_from_prompt_response(_required_str(record, prompt_field),
                                                     _required_str(record, response_field))
    else:
        raise ValueError(f"unknown SFT format {format!r}")
    if system is not None and not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def _detect_format(record: dict, prompt_field: str, response_field: str) -> tuple[str, str, str]:
    if "messages" in record:
        return "messages", prompt_field, response_field
    if "conversations" in record:
        return "sharegpt", prompt_field, response_field
    for prompt_key, response_key in ((prompt_field, response_field), *_KNOWN_PAIRS):
        if prompt_key in record and response_key in record:
            return "prompt_response", prompt_key, response_key
    raise KeyError(f"cannot tell the schema from keys {sorted(record)}: expected 'messages', 'conversations', "
                   f"or a prompt/response pair such as {(prompt_field, response_field)} or {list(_KNOWN_PAIRS)}")


def _sharegpt_turn(index: int, turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise ValueError(f"conversations[{index}] must have 'from' and 'value'")
    role = _SHAREGPT_ROLES.get(turn["from"])
    if role is None:
        raise ValueError(f"conversations[{index}]: unknown speaker {turn['from']!r} "
                         f"(expected one of {sorted(_SHAREGPT_ROLES)})")
    return {"role": role, "content": turn["value"]}


def _required(record: dict, key: str) -> Any:
    if key not in record:
        raise KeyError(f"missing key {key!r} (record has {sorted(record)})")
    return record[key]


def _required_str(record: dict, key: str) -> str:
    value = _required(record, key)
    if not isinstance(value, str):
        raise ValueError(f"key {key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_str(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"key {key!r} must be a string or null, got {type(value).__name__}")
    return value or None


def load_conversations(paths: Sequence[str], *, config: SftDataConfig) -> list[tuple[str, list[dict[str, str]]]]:
    """All ``(location, messages)`` of the given files, in file order. Bad records raise :class:`RecordError`
    naming ``file:line`` and the reason, or are logged and skipped with ``config.skip_bad_records``."""
    conversations, skipped = [], 0
    for path in paths:
        for location, record in iter_records(path):
            try:
                if isinstance(record, RecordError):
                    raise record
                messages = record_to_messages(record, format=config.format, prompt_field=config.prompt_field,
                                              response_field=config.response_field, system_field=config.system_field)
            except (KeyError, ValueError) as exc:
                error = exc if isinstance(exc, RecordError) else RecordError(f"{location}: {_reason(exc)}")
                if not config.skip_bad_records:
                    raise error from exc
                skipped += 1
                if skipped <= 10:
                    logger.warning("skipping bad SFT record: %s", error)
                continue
            conversations.append((location, messages))
    if skipped:
        logger.warning("skipped %d bad SFT records in %s", skipped, list(paths))
    return conversations


def _reason(exc: Exception) -> str:
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)


# --------------------------------------------------------------------------------------------------- datasets

@dataclass
class PackingStats:
    """What happened while preparing one split (logged, and useful in tests)."""

    conversations: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    sequences: int = 0
    fill_ratio: float = 0.0  # real tokens / (sequences * seq_length)


class PackedSftDataset(torch.utils.data.Dataset):
    """Documents packed into sequences; ``len()`` is ``num_samples`` (default: one epoch of packed sequences).

    Args:
        documents: ``(token_ids [n_i], target_mask [n_i])`` per conversation, ``n_i - 1 <= seq_length``.
        seq_length: positions per sample.
        pad_token_id: id for padding (loss-masked).
        seed: the order of packed sequences is a fresh permutation per epoch, drawn from ``(seed, epoch)``.
        num_samples: samples to serve; past one epoch the sequences repeat in a new order.
        create_attention_mask: also return ``attention_mask [1, s, s]`` (True = masked).
    """

    def __init__(self, documents: Sequence[tuple[np.ndarray, np.ndarray]], *, seq_length: int, pad_token_id: int,
                 seed: int, num_samples: int | None = None, create_attention_mask: bool = False) -> None:
        if not documents:
            raise ValueError("no SFT documents to pack")
        self.documents = list(documents)
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.create_attention_mask = create_attention_mask
        self.bins = pack_best_fit_decreasing([len(ids) - 1 for ids, _ in self.documents], seq_length)
        # one boundary per document, plus 0, plus a possible padding segment
        self.cu_seqlens_width = max(len(b) for b in self.bins) + 2
        self.num_samples = len(self.bins) if num_samples is None else int(num_samples)
        self.stats: PackingStats | None = None  # set by build_sft_datasets
        self._epoch_orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_orders:
            self._epoch_orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.bins))
        return self._epoch_orders[epoch]

    def bin_for(self, index: int) -> list[int]:
        """Document indices packed into sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        epoch, position = divmod(index, len(self.bins))
        return self.bins[int(self._order(epoch)[position])]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = build_packed_sample([self.documents[d] for d in self.bin_for(index)], seq_length=self.seq_length,
                                     pad_token_id=self.pad_token_id, cu_seqlens_width=self.cu_seqlens_width)
        if self.create_attention_mask:
            sample["attention_mask"] = block_causal_attention_mask(sample["cu_seqlens"], self.seq_length)
        return sample


def tokenize_conversations(conversations: Sequence[tuple[str, list[dict[str, str]]]], *, template: ChatTemplate,
                           seq_length: int, overlong: str, skip_bad_records: bool = False
                           ) -> tuple[list[tuple[np.ndarray, np.ndarray]], PackingStats]:
    """Render each conversation; apply the overlong policy; drop those with no trained token."""
    stats = PackingStats(conversations=len(conversations))
    documents = []
    for location, messages in conversations:
        try:
            rendered = template.render(messages)
        except ConversationError as exc:
            if not skip_bad_records:
                raise RecordError(f"{location}: {exc}") from exc
            logger.warning("skipping bad SFT record: %s: %s", location, exc)
            continue
        ids = np.asarray(rendered.token_ids, dtype=np.int64)
        mask = np.asarray(rendered.assistant_mask, dtype=np.float32)
        if len(ids) - 1 > seq_length:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
            stats.truncated += 1
        if len(ids) < 2 or not mask[1:].any():
            stats.dropped_no_target += 1
            continue
        documents.append((ids, mask))
    return documents, stats


def split_train_valid(count: int, *, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(count)`` into sorted train and validation indices (at least one of each when
    ``valid_fraction > 0`` and ``count >= 2``)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    valid_count = round(count * valid_fraction)
    if valid_fraction > 0 and count >= 2:
        valid_count = min(max(valid_count, 1), count - 1)
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[valid_count:]), np.sort(order[:valid_count])


def build_sft_datasets(*, config: SftDataConfig, tokenizer: Any, seq_length: int, seed: int,
                       train_samples: int | None = None, valid_samples: int | None = None
                       ) -> tuple[PackedSftDataset, PackedSftDataset | None]:
    """(train, valid) packed SFT datasets from ``config.paths``; ``valid`` is None when ``valid_fraction == 0``."""
    if not config.paths:
        raise ValueError("data.sft.paths is empty: give the SFT data files or dataset directories")
    template = ChatTemplate(tokenizer, system_prompt=config.system_prompt, reasoning=config.reasoning)
    conversations = load_conversations(config.paths, config=config)
    train_index, valid_index = split_train_valid(len(conversations), valid_fraction=config.valid_fraction, seed=seed)
    pad_token_id = padding_token_id(tokenizer)
    datasets: list[PackedSftDataset | None] = []
    for name, index, samples in (("train", train_index, train_samples), ("valid", valid_index, valid_samples)):
        if name == "valid" and len(index) == 0:
            datasets.append(None)
            continue
        documents, stats = tokenize_conversations([conversations[i] for i in index], template=template,
                                                  seq_length=seq_length, overlong=config.overlong,
                                                  skip_bad_records=config.skip_bad_records)
        dataset = PackedSftDataset(documents, seq_length=seq_length, pad_token_id=pad_token_id, seed=seed,
                                   num_samples=samples, create_attention_mask=config.create_attention_mask)
        stats.sequences = len(dataset.bins)
        stats.fill_ratio = sum(len(ids) - 1 for ids, _ in documents) / (len(dataset.bins) * seq_length)
        dataset.stats = stats
        logger.info("SFT %s split: %s", name, stats)
        datasets.append(dataset)
    return datasets[0], datasets[1]


def padding_token_id(tokenizer: Any) -> int:
    """A real vocabulary id for padding (its loss is masked): ``pad`` if valid, else ``eod``."""
    for name in ("pad", "eod"):
        value = getattr(tokenizer, name, None)
        if value is not None and 0 <= int(value) < int(tokenizer.vocab_size):
            return int(value)
    return 0
