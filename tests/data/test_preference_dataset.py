"""Preference data: pair schemas, CodeUltraFeedback ratings, pairs derived from ratings, token datasets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from betterai_megatron.data.preference_dataset import (
    PreferenceDataConfig,
    RatedPrompt,
    build_preference_datasets,
    load_preference_records,
    pairs_from_ratings,
    parse_preference_record,
)
from betterai_megatron.data.sft_dataset import RecordError

try:
    import test_sft_support as support
except ImportError:  # tests/ made a package
    from tests.data import test_sft_support as support

CharTokenizer = support.CharTokenizer
sp_tokenizer = support.sp_tokenizer  # a fixture


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def codeultrafeedback_rows(instruction, attribute, ratings):
    """One CodeUltraFeedback row: responses of models m0..m3, one rating string per model for ``attribute``."""
    return {"instruction": instruction, "preference": attribute, "models": [f"m{i}" for i in range(len(ratings))],
            "responses": [{"model": f"m{i}", "response": f"{instruction} answer {i}"} for i in range(len(ratings))],
            "annotations": [{"model": f"m{i}", "rating": r, "rationale": "because"} for i, r in enumerate(ratings)]}


def test_pairs_from_ratings_by_hand():
    rated = RatedPrompt("f:1", [{"role": "user", "content": "q"}], ["r0", "r1", "r2"],
                        [{"a": 5.0, "b": 3.0}, {"a": 2.0, "b": 4.0}, {"a": 5.0}])
    # mean over shared attributes: (r0, r1) on {a, b}: 4 vs 3 -> r0 wins by 1; (r0, r2) on {a}: tie, skipped;
    # (r1, r2) on {a}: 2 vs 5 -> r2 wins by 3
    pairs = pairs_from_ratings(rated)
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("r0", "r1", 1.0), ("r2", "r1", 3.0)]
    # attribute b: only (r0, r1) have it: 3 vs 4 -> r1 wins
    assert [(p.chosen, p.rejected) for p in pairs_from_ratings(rated, attribute="b")] == [("r1", "r0")]
    # the margin is strict: a difference of exactly 1 is not enough for min_margin=1
    assert [(p.chosen, p.rejected) for p in pairs_from_ratings(rated, min_margin=1.0)] == [("r2", "r1")]


def test_codeultrafeedback_rows_merge_into_multi_attribute_ratings(tmp_path):
    rows = [codeultrafeedback_rows("sum a list", "readability", ["5", "3", "N/A", "1"]),
            codeultrafeedback_rows("sum a list", "complexity", ["2", "4", "4", "1"]),
            codeultrafeedback_rows("reverse", "readability", ["1", "2", "3", "4"])]
    pairs, rated = load_preference_records([str(write_jsonl(tmp_path / "cuf.jsonl", rows))],
                                           config=PreferenceDataConfig())
    assert pairs == []
    assert [r.prompt[0]["content"] for r in rated] == ["sum a list", "reverse"]
    assert rated[0].ratings == [{"readability": 5.0, "complexity": 2.0}, {"readability": 3.0, "complexity": 4.0},
                                {"complexity": 4.0}, {"readability": 1.0, "complexity": 1.0}]
    assert rated[0].location == f"{tmp_path / 'cuf.jsonl'}:1"


def test_pair_schemas():
    plain = parse_preference_record({"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": 8,
                                     "score_rejected": 5.5})
    assert (plain.prompt, plain.chosen, plain.rejected, plain.margin) == (
        [{"role": "user", "content": "q"}], "good", "bad", 2.5)
    argilla = parse_preference_record({"instruction": "q", "chosen_response": "good", "rejected_response": "bad"})
    assert argilla.chosen == "good" and math.isnan(argilla.margin)
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    as_messages = parse_preference_record({"chosen": [*turns, {"role": "assistant", "content": "good"}],
                                           "rejected": [*turns, {"role": "assistant", "content": "bad"}]})
    assert (as_messages.prompt, as_messages.chosen, as_messages.rejected) == (turns, "good", "bad")
    generic = parse_preference_record({"prompt": "q", "responses": [{"response": "x", "ratings": {"a": "4"}},
                                                                    {"response": "y", "ratings": {"a": None}}]})
    assert generic.ratings == [{"a": 4.0}, {}]


@pytest.mark.parametrize("record, match", [
    ({"chosen": "a", "rejected": "b"}, "missing prompt key"),
    ({"prompt": "q", "chosen": "a", "rejected": ["x"]}, "must both be strings or both message lists"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}, "share their prompt"),
    ({"instruction": "q", "responses": [{"model": "m", "response": "x"}], "annotations": []}, "'preference'"),
    ({"prompt": "q"}, "expected chosen/rejected or responses"),
])
def test_bad_preference_records(record, match):
    with pytest.raises((KeyError, ValueError), match=match):
        parse_preference_record(record)


def test_bad_record_location_and_skip(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    with pytest.raises(RecordError, match=f"{path}:2: "):
        load_preference_records([str(path)], config=PreferenceDataConfig())
    pairs, _ = load_preference_records([str(path)], config=PreferenceDataConfig(skip_bad_records=True))
    assert len(pairs) == 1


def test_token_datasets_end_to_end(tmp_path, sp_tokenizer):
    rows = [codeultrafeedback_rows(f"task {i}", attribute, [str((i + j * k) % 5 + 1) for j in range(4)])
            for i in range(10) for k, attribute in enumerate(["readability", "complexity"], start=1)]
    rows.append({"prompt": "given pair", "chosen": "good", "rejected": "bad"})
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    config = PreferenceDataConfig(paths=[str(path)], valid_fraction=0.3)
    built = build_preference_datasets(config=config, tokenizer=sp_tokenizer, seq_length=64, seed=0)
    assert built.attributes == ["complexity", "readability"]
    im_end = sp_tokenizer.special_token_id("<|im_end|>")
    train_prompts = set()
    for dataset, prompts in ((built.train_pairs, train_prompts), (built.valid_pairs, set())):
        for index in range(len(dataset)):
            sample = dataset[index]
            for side in ("chosen", "rejected"):
                tokens, length = sample[f"{side}_tokens"], int(sample[f"{side}_length"])
                assert tokens.shape == (64,) and tokens[length - 1] == im_end  # the reward is read here
                assert (tokens[length:] == sp_tokenizer.pad).all()
                text = sp_tokenizer.detokenize(tokens[:length].tolist())
                prompts.add(text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0])
            if dataset is built.valid_pairs:
                assert not prompts & train_prompts  # split by prompt: no prompt on both sides
    # every derived pair prefers the response with the higher mean rating
    rated = built.train_ratings[0]
    assert rated["scores"].shape == (2,) and rated["score_mask"].all()
    total_pairs = len(built.train_pairs) + len(built.valid_pairs)
    _, rated_prompts = load_preference_records([str(path)], config=config)
    assert total_pairs == 1 + sum(len(pairs_from_ratings(r)) for r in rated_prompts)
    assert len(built.train_ratings) + len(built.valid_ratings) == 40


def test_margin_and_attribute_choices_reach_the_dataset(tmp_path, sp_tokenizer):
    rows = [codeultrafeedback_rows("t", "readability", ["5", "4", "1", "1"])]
    path = write_jsonl(tmp_path / "one.jsonl", rows)
    base = dict(tokenizer=sp_tokenizer, seq_length=64, seed=0)
    built = build_preference_datasets(config=PreferenceDataConfig(paths=[str(path)], valid_fraction=0.0), **base)
    # ratings 5, 4, 1, 1: pairs (0,1) (0,2) (0,3) (1,2) (1,3); (2,3) is a tie
    assert len(built.train_pairs) == 5 and built.valid_pairs is None
    assert sorted(float(built.train_pairs[i]["margin"]) for i in range(5)) == [1.0, 3.0, 3.0, 4.0, 4.0]
    strict = build_preference_datasets(config=PreferenceDataConfig(paths=[str(path)], valid_fraction=0.0,
                                                                   min_rating_margin=3.0), **base)
    assert len(strict.train_pairs) == 2
    with pytest.raises(ValueError, match="pair_attribute='style' is not among"):
        build_preference_datasets(config=PreferenceDataConfig(paths=[str(path)], pair_attribute="style"), **base)


def test_pairs_longer_than_seq_length_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "q", "chosen": "a" * 50, "rejected": "b"},
                                                  {"prompt": "r", "chosen": "c", "rejected": "d"}])
    built = build_preference_datasets(config=PreferenceDataConfig(paths=[str(path)], valid_fraction=0.0),
                                      tokenizer=CharTokenizer(), seq_length=40, seed=0)
    assert len(built.train_pairs) == 1 and built.dropped_overlong == 1
    assert torch.isnan(built.train_pairs[0]["margin"])  # a given pair without scores has no margin
