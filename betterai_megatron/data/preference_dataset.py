"""Preference data for reward models: chosen/rejected pairs and multi-attribute ratings.

Owns (config section ``data.preference``, :class:`PreferenceDataConfig`):

* reading preference records (files and directories as in :func:`.sft_dataset.iter_records`) in three schemas —
  :func:`parse_preference_record`:

  - **pairs**: ``chosen``/``rejected`` (or ``chosen_response``/``rejected_response``) as strings with a
    ``prompt``/``instruction``/``question``, or as full message lists sharing their prompt turns (HF
    ultrafeedback_binarized); an optional margin from ``score_chosen``/``score_rejected``,
    ``chosen_rating``/``rejected_rating`` or ``chosen_avg_rating``/``rejected_avg_rating``;
  - **CodeUltraFeedback**: ``instruction``, ``preference`` (the attribute rated in this row), ``responses:
    [{model, response}]``, ``annotations: [{model, rating, rationale}]`` (ratings are strings; non-numeric ones
    such as ``"N/A"`` count as missing). Rows with the same instruction are merged, so each response carries a
    rating per attribute (the dataset has one row per instruction and attribute);
  - **generic ratings**: a prompt with ``responses: [{response, ratings: {attribute: score}}]``;

* :func:`pairs_from_ratings` — every pair of responses of one prompt whose rating differs by more than a margin
  (on one attribute, or on the mean over the attributes both responses were rated on), the higher one chosen;
* token datasets: :class:`PreferencePairDataset` (pairwise Bradley-Terry reward models, Ouyang et al. 2022) and
  :class:`RatedResponseDataset` (per-attribute regression, as in SteerLM/ArmoRM), each conversation rendered with
  the chat template (prompt turns + the response as the assistant turn, ending in ``<|im_end|>``, where the
  reward is read). The train/validation split is by prompt, so no prompt leaks across it.

Samples (``s = seq_length``, right-padded; causal attention makes padding harmless, the reward position is
``length - 1``): pairs give ``chosen_tokens [s]``, ``rejected_tokens [s]``, ``chosen_length []``,
``rejected_length []``, ``margin []`` (NaN when unknown), ``position_ids [s]``; ratings give ``tokens [s]``,
``length []``, ``scores [A]`` (NaN where not rated), ``score_mask [A]`` bool, ``position_ids [s]``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import torch

from betterai_megatron.data.chat_template import (
    ChatTemplate,
    ConversationError,
    validate_messages,
)
from betterai_megatron.data.sft_dataset import (
    RecordError,
    iter_records,
    padding_token_id,
    split_train_valid,
)

logger = logging.getLogger(__name__)

_PROMPT_KEYS = ("prompt", "instruction", "question")
_PAIR_KEYS = (("chosen", "rejected"), ("chosen_response", "rejected_response"))
_SCORE_KEYS = (("score_chosen", "score_rejected"), ("chosen_rating", "rejected_rating"),
               ("chosen_avg_rating", "rejected_avg_rating"))


@dataclass
class PreferenceDataConfig:
    """``data.preference``: data for reward-model training."""

    paths: list[str] = field(default_factory=list)
    format: Literal["auto", "pairs", "ratings"] = "auto"
    attributes: Optional[list[str]] = None  # rating attributes to keep (None: every attribute seen)
    pair_attribute: Optional[str] = None  # derive pairs from this attribute (None: mean over shared attributes)
    min_rating_margin: float = 0.0  # a derived pair needs rating(chosen) - rating(rejected) > this
    system_prompt: Optional[str] = None
    valid_fraction: float = 0.05  # of prompts
    skip_bad_records: bool = False


@dataclass
class PreferencePair:
    location: str
    prompt: list[dict[str, str]]  # the turns before the answer
    chosen: str
    rejected: str
    margin: float = math.nan


@dataclass
class RatedPrompt:
    location: str
    prompt: list[dict[str, str]]
    responses: list[str]
    ratings: list[dict[str, float]]  # per response: attribute -> score


# --------------------------------------------------------------------------------------------------- schemas

def parse_preference_record(record: Any, *, format: str = "auto") -> PreferencePair | RatedPrompt:
    """One record -> a pair or a rated prompt (location left empty). Raises KeyError/ValueError naming the key."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    pair_keys = next(((c, r) for c, r in _PAIR_KEYS if c in record and r in record), None)
    if format == "pairs" or (format == "auto" and pair_keys):
        if pair_keys is None:
            raise KeyError(f"missing chosen/rejected keys {list(_PAIR_KEYS)} (record has {sorted(record)})")
        return _parse_pair(record, *pair_keys)
    if "responses" in record:
        return _parse_rated(record)
    raise KeyError(f"cannot tell the schema from keys {sorted(record)}: expected chosen/rejected or responses")


def _prompt_turns(record: dict) -> list[dict[str, str]]:
    key = next((k for k in _PROMPT_KEYS if k in record), None)
    if key is None:
        raise KeyError(f"missing prompt key (one of {list(_PROMPT_KEYS)}; record has {sorted(record)})")
    value = record[key]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return validate_messages(value)
    raise ValueError(f"key {key!r} must be a string or a list of turns, got {type(value).__name__}")


def _parse_pair(record: dict, chosen_key: str, rejected_key: str) -> PreferencePair:
    chosen, rejected = record[chosen_key], record[rejected_key]
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen_turns, rejected_turns = validate_messages(chosen), validate_messages(rejected)
        if chosen_turns[-1]["role"] != "assistant" or rejected_turns[-1]["role"] != "assistant":
            raise ValueError(f"{chosen_key!r} and {rejected_key!r} must end with an assistant turn")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise ValueError(f"{chosen_key!r} and {rejected_key!r} must share their prompt turns")
        prompt, chosen, rejected = chosen_turns[:-1], chosen_turns[-1]["content"], rejected_turns[-1]["content"]
        if not prompt:
            prompt = _prompt_turns(record)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _prompt_turns(record)
    else:
        raise ValueError(f"{chosen_key!r}/{rejected_key!r} must both be strings or both message lists")
    margin = math.nan
    for high, low in _SCORE_KEYS:
        if high in record and low in record:
            margin = _as_float(record[high], high) - _as_float(record[low], low)
            break
    return PreferencePair("", prompt, chosen, rejected, margin)


def _parse_rated(record: dict) -> RatedPrompt:
    prompt = _prompt_turns(record)
    responses = record["responses"]
    if not isinstance(responses, list) or not responses:
        raise ValueError("key 'responses' must be a non-empty list")
    if "annotations" in record:  # CodeUltraFeedback: one attribute per row, ratings matched by model
        attribute = record.get("preference")
        if not isinstance(attribute, str) or not attribute:
            raise KeyError("a CodeUltraFeedback row needs a string 'preference' (the rated attribute)")
        ratings_by_model = {}
        for i, note in enumerate(record["annotations"] or []):
            if not isinstance(note, dict) or "model" not in note:
                raise ValueError(f"annotations[{i}] must have 'model' and 'rating'")
            score = _rating_or_none(note.get("rating"))
            if score is not None:
                ratings_by_model[note["model"]] = score
        texts, ratings = [], []
        for i, item in enumerate(responses):
            if not isinstance(item, dict) or not isinstance(item.get("response"), str):
                raise ValueError(f"responses[{i}] must have a string 'response'")
            texts.append(item["response"])
            score = ratings_by_model.get(item.get("model"))
            ratings.append({} if score is None else {attribute: score})
        return RatedPrompt("", prompt, texts, ratings)
    texts, ratings = [], []
    for i, item in enumerate(responses):
        if not isinstance(item, dict) or not isinstance(item.get("response"), str):
            raise ValueError(f"responses[{i}] must have a string 'response'")
        raw = item.get("ratings", {})
        if not isinstance(raw, dict):
            raise ValueError(f"responses[{i}].ratings must map attribute -> score")
        texts.append(item["response"])
        ratings.append({str(k): v for k, v in ((k, _rating_or_none(v)) for k, v in raw.items()) if v is not None})
    return RatedPrompt("", prompt, texts, ratings)


def _as_float(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"key {key!r} must be a number, got {value!r}") from exc


def _rating_or_none(value: Any) -> float | None:
    """Ratings may be numbers or numeric strings ("4"); anything else ("N/A", null) is a missing rating."""
    if isinstance(value, bool):
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if math.isfinite(score) else None


def merge_rated_prompts(items: Sequence[RatedPrompt]) -> list[RatedPrompt]:
    """Merge rated prompts with the same prompt turns: responses with the same text share one ratings dict
    (CodeUltraFeedback rates each instruction's responses once per attribute, one row per attribute)."""
    merged: dict[str, RatedPrompt] = {}
    for item in items:
        key = json.dumps(item.prompt, sort_keys=True)
        target = merged.get(key)
        if target is None:
            merged[key] = RatedPrompt(item.location, item.prompt, list(item.responses),
                                      [dict(r) for r in item.ratings])
            continue
        for text, ratings in zip(item.responses, item.ratings):
            if text in target.responses:
                target.ratings[target.responses.index(text)].update(ratings)
            else:
                target.responses.append(text)
                target.ratings.append(dict(ratings))
    return list(merged.values())


def pairs_from_ratings(rated: RatedPrompt, *, attribute: str | None = None, min_margin: float = 0.0
                       ) -> list[PreferencePair]:
    """All pairs ``(i, j)``, ``i < j``, whose scores differ by more than ``min_margin``; the higher is chosen.

    The score is the rating of ``attribute``, or with ``attribute=None`` the mean over the attributes both
    responses were rated on. Pairs lacking a score are skipped; ``margin`` is the (positive) score difference.
    """
    pairs = []
    for i in range(len(rated.responses)):
        for j in range(i + 1, len(rated.responses)):
            a, b = rated.ratings[i], rated.ratings[j]
            shared = [attribute] if attribute is not None else sorted(set(a) & set(b))
            if not shared or any(k not in a or k not in b for k in shared):
                continue
            diff = sum(a[k] for k in shared) / len(shared) - sum(b[k] for k in shared) / len(shared)
            if abs(diff) <= min_margin:
                continue
            high, low = (i, j) if diff > 0 else (j, i)
            pairs.append(PreferencePair(rated.location, rated.prompt, rated.responses[high], rated.responses[low],
                                        abs(diff)))
    return pairs


def load_preference_records(paths: Sequence[str], *, config: PreferenceDataConfig
                            ) -> tuple[list[PreferencePair], list[RatedPrompt]]:
    """Read every record; bad ones raise :class:`RecordError` (``file:line: reason``) or are skipped."""
    pairs, rated, skipped = [], [], 0
    for path in paths:
        for location, record in iter_records(path):
            try:
                if isinstance(record, RecordError):
                    raise record
                item = parse_preference_record(record, format=config.format)
            except (KeyError, ValueError) as exc:
                reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                error = exc if isinstance(exc, RecordError) else RecordError(f"{location}: {reason}")
                if not config.skip_bad_records:
                    raise error from exc
                skipped += 1
                if skipped <= 10:
                    logger.warning("skipping bad preference record: %s", error)
                continue
            item.location = location
            (pairs if isinstance(item, PreferencePair) else rated).append(item)
    if skipped:
        logger.warning("skipped %d bad preference records", skipped)
    return pairs, merge_rated_prompts(rated)


# --------------------------------------------------------------------------------------------------- datasets

def _padded(ids: np.ndarray, seq_length: int, pad_token_id: int) -> torch.Tensor:
    out = torch.full((seq_length,), pad_token_id, dtype=torch.int64)
    out[: len(ids)] = torch.from_numpy(ids)
    return out


class PreferencePairDataset(torch.utils.data.Dataset):
    """Tokenized pairs ``(chosen_ids, rejected_ids, margin)``, each at most ``seq_length`` tokens."""

    def __init__(self, items: Sequence[tuple[np.ndarray, np.ndarray, float]], *, seq_length: int,
                 pad_token_id: int) -> None:
        self.items, self.seq_length, self.pad_token_id = list(items), seq_length, pad_token_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        chosen, rejected, margin = self.items[index]
        return {
            "chosen_tokens": _padded(chosen, self.seq_length, self.pad_token_id),
            "rejected_tokens": _padded(rejected, self.seq_length, self.pad_token_id),
            "chosen_length": torch.tensor(len(chosen), dtype=torch.int64),
            "rejected_length": torch.tensor(len(rejected), dtype=torch.int64),
            "margin": torch.tensor(margin, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


class RatedResponseDataset(torch.utils.data.Dataset):
    """Tokenized (prompt + response) with a score per attribute of :attr:`attributes` (NaN where not rated)."""

    def __init__(self, items: Sequence[tuple[np.ndarray, np.ndarray]], *, attributes: Sequence[str],
                 seq_length: int, pad_token_id: int) -> None:
        self.items, self.attributes = list(items), list(attributes)
        self.seq_length, self.pad_token_id = seq_length, pad_token_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, scores = self.items[index]
        scores_tensor = torch.from_numpy(scores.astype(np.float32))
        return {
            "tokens": _padded(ids, self.seq_length, self.pad_token_id),
            "length": torch.tensor(len(ids), dtype=torch.int64),
            "scores": scores_tensor,
            "score_mask": ~torch.isnan(scores_tensor),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


@dataclass
class PreferenceDatasets:
    """What :func:`build_preference_datasets` returns; the rating datasets are None without rated data."""

    train_pairs: PreferencePairDataset
    valid_pairs: PreferencePairDataset | None
    train_ratings: RatedResponseDataset | None
    valid_ratings: RatedResponseDataset | None
    attributes: list[str]
    dropped_overlong: int = 0


def build_preference_datasets(*, config: PreferenceDataConfig, tokenizer: Any, seq_length: int, seed: int
                              ) -> PreferenceDatasets:
    """Pairs (given, and derived from ratings) and per-attribute rating datasets, split by prompt."""
    if not config.paths:
        raise ValueError("data.preference.paths is empty: give the preference data files or dataset directories")
    template = ChatTemplate(tokenizer, system_prompt=config.system_prompt)
    given_pairs, rated = load_preference_records(config.paths, config=config)
    attributes = list(config.attributes) if config.attributes is not None else sorted(
        {a for item in rated for r in item.ratings for a in r})
    if config.pair_attribute is not None and rated and config.pair_attribute not in attributes:
        raise ValueError(f"data.preference.pair_attribute={config.pair_attribute!r} is not among the rated "
                         f"attributes {attributes}")
    keep = set(attributes)
    for item in rated:
        item.ratings = [{k: v for k, v in r.items() if k in keep} for r in item.ratings]
    # split by prompt so that no prompt is on both sides
    prompt_keys = sorted({json.dumps(p.prompt, sort_keys=True) for p in [*given_pairs, *rated]})
    _, valid_index = split_train_valid(len(prompt_keys), valid_fraction=config.valid_fraction, seed=seed)
    valid_keys = {prompt_keys[i] for i in valid_index}
    pad_token_id = padding_token_id(tokenizer)
    dropped = 0

    def encode(prompt: list[dict[str, str]], response: str, location: str) -> np.ndarray | None:
        nonlocal dropped
        try:
            ids = template.render([*prompt, {"role": "assistant", "content": response}]).token_ids
        except ConversationError as exc:
            raise RecordError(f"{location}: {exc}") from exc
        if len(ids) > seq_length:
            dropped += 1
            return None
        return np.asarray(ids, dtype=np.int64)

    splits: dict[bool, dict[str, list]] = {False: {"pairs": [], "ratings": []}, True: {"pairs": [], "ratings": []}}
    derived = [p for item in rated for p in pairs_from_ratings(item, attribute=config.pair_attribute,
                                                               min_margin=config.min_rating_margin)]
    for pair in [*given_pairs, *derived]:
        chosen, rejected = encode(pair.prompt, pair.chosen, pair.location), encode(pair.prompt, pair.rejected,
                                                                                    pair.location)
        if chosen is not None and rejected is not None:
            is_valid = json.dumps(pair.prompt, sort_keys=True) in valid_keys
            splits[is_valid]["pairs"].append((chosen, rejected, pair.margin))
    for item in rated:
        is_valid = json.dumps(item.prompt, sort_keys=True) in valid_keys
        for text, ratings in zip(item.responses, item.ratings):
            if not ratings:
                continue
            ids = encode(item.prompt, text, item.location)
            if ids is not None:
                scores = np.array([ratings.get(a, np.nan) for a in attributes], dtype=np.float64)
                splits[is_valid]["ratings"].append((ids, scores))
    if not splits[False]["pairs"]:
        raise ValueError(f"no training pairs in {config.paths} (after the margin and seq_length={seq_length})")

    def pair_set(items: list) -> PreferencePairDataset | None:
        return PreferencePairDataset(items, seq_length=seq_length, pad_token_id=pad_token_id) if items else None

    def rating_set(items: list) -> RatedResponseDataset | None:
        return RatedResponseDataset(items, attributes=attributes, seq_length=seq_length,
                                    pad_token_id=pad_token_id) if items else None

    if dropped:
        logger.warning("dropped %d preference responses longer than seq_length=%d", dropped, seq_length)
    return PreferenceDatasets(pair_set(splits[False]["pairs"]), pair_set(splits[True]["pairs"]),
                              rating_set(splits[False]["ratings"]), rating_set(splits[True]["ratings"]),
                              attributes, dropped)
