"""Pretraining datasets through megatron-core: blend weights, splits, language filtering, mock data, errors.

Indexed data is written in the test with megatron-core's ``IndexedDatasetBuilder``. Every document is made of one
repeated token that encodes (prefix, document id), so each served sample tells where its tokens came from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from betterai_megatron.data.pretrain_datasets import (
    DataConfig,
    build_pretrain_datasets,
    check_data_config,
    language_sidecar_paths,
    parse_split,
)

EOD = 0
BASES = {"a": 1, "b": 1001}  # document d of prefix p is the token BASES[p] + d, repeated, then EOD


class IdTokenizer:
    """The three attributes megatron's datasets read."""

    vocab_size, eod, pad = 4096, EOD, 4095


def write_prefix(directory, name, num_documents, seed=0):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(directory / name)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in range(num_documents):
        length = int(rng.integers(3, 24))
        builder.add_document(np.array([BASES[name] + doc] * (length - 1) + [EOD]), [length])
    builder.finalize(prefix + ".idx")
    return prefix


def origins(sample):
    """{(prefix, document)} of the non-EOD tokens of a sample."""
    found = set()
    for token in sample["tokens"].tolist() + sample["labels"].tolist()[-1:]:
        if token != EOD:
            name = "a" if token < BASES["b"] else "b"
            found.add((name, token - BASES[name]))
    return found


def build(tmp_path, config, **sizes):
    sizes = {"train_samples": 200, "valid_samples": 20, "test_samples": 0, **sizes}
    return build_pretrain_datasets(data_config=config, tokenizer=IdTokenizer(), seq_length=16, seed=1234, **sizes)


def test_blend_sample_proportions_follow_the_weights(tmp_path):
    prefixes = [write_prefix(tmp_path, "a", 400), write_prefix(tmp_path, "b", 300, seed=1)]
    config = DataConfig(prefixes=prefixes, weights=[0.3, 0.7], split="90,10,0", cache_dir=str(tmp_path / "cache"))
    train, valid, test = build(tmp_path, config, train_samples=2000, valid_samples=50)
    assert len(train) == 2000 and len(valid) == 50 and test is None
    counts = {"a": 0, "b": 0}
    for index in range(len(train)):
        sample = train[index]
        names = {name for name, _ in origins(sample)}
        assert len(names) == 1  # a sample comes from one prefix
        (name,) = names
        assert int(sample["dataset_id"]) == ("a", "b").index(name)
        counts[name] += 1
    assert counts["a"] / 2000 == pytest.approx(0.3, abs=0.01)
    assert counts["b"] / 2000 == pytest.approx(0.7, abs=0.01)


def test_split_ranges_and_sample_layout(tmp_path):
    prefix = write_prefix(tmp_path, "a", 100)
    train, valid, _ = build(tmp_path, DataConfig(prefixes=[prefix], split="80,20,0"))
    train_docs = {d for i in range(len(train)) for _, d in origins(train[i])}
    valid_docs = {d for i in range(len(valid)) for _, d in origins(valid[i])}
    # megatron splits documents into contiguous ranges: the first 80 train, the last 20 validate
    assert train_docs <= set(range(80)) and valid_docs <= set(range(80, 100))
    assert len(train_docs) == 80 and len(valid_docs) == 20  # 200 samples cover several epochs of the split
    sample = train[0]
    assert sample["tokens"].shape == (16,) and sample["loss_mask"].shape == (16,)
    assert "attention_mask" not in sample
    again, _, _ = build(tmp_path, DataConfig(prefixes=[prefix], split="80,20,0"))
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(20))  # seeded


def write_languages(prefix, ids, names):
    ids_path, names_path = language_sidecar_paths(prefix)
    np.save(ids_path, np.asarray(ids, dtype=np.int16))
    names_path.write_text(json.dumps({str(i): n for i, n in enumerate(names)}))


def test_languages_keep_only_chosen_documents_within_each_split(tmp_path):
    prefix = write_prefix(tmp_path, "a", 120)
    language_of = [d % 3 for d in range(120)]  # 0 python, 1 rust, 2 go
    write_languages(prefix, language_of, ["Python", "Rust", "Go"])
    config = DataConfig(prefixes=[prefix], split="75,25,0", languages=["python", "go"], cache_dir=str(tmp_path / "c"))
    train, valid, _ = build(tmp_path, config)
    train_docs = {d for i in range(len(train)) for _, d in origins(train[i])}
    valid_docs = {d for i in range(len(valid)) for _, d in origins(valid[i])}
    assert train_docs == {d for d in range(90) if language_of[d] != 1}
    assert valid_docs == {d for d in range(90, 120) if language_of[d] != 1}
    # the language choice is part of megatron's cache key: rust alone gets its own indices, not the cached ones
    rust, _, _ = build(tmp_path, DataConfig(prefixes=[prefix], split="75,25,0", languages=["rust"],
                                            cache_dir=str(tmp_path / "c")))
    assert {d for i in range(len(rust)) for _, d in origins(rust[i])} == {d for d in range(90) if d % 3 == 1}


def test_language_sidecar_errors(tmp_path):
    prefix = write_prefix(tmp_path, "a", 30)
    config = DataConfig(prefixes=[prefix], split="1", languages=["python"])
    with pytest.raises(FileNotFoundError, match=r"a\.lang\.npy"):
        build(tmp_path, config)
    write_languages(prefix, [0] * 29, ["python"])
    with pytest.raises(ValueError, match="has 29 language ids but .* has 30 documents"):
        build(tmp_path, config)
    write_languages(prefix, [0] * 30, ["python", "rust"])
    with pytest.raises(ValueError, match=r"none of them occur .* \['python', 'rust'\]"):
        build(tmp_path, DataConfig(prefixes=[prefix], split="1", languages=["cobol"]))


@pytest.mark.timeout(120)
def test_an_empty_split_asked_for_samples_fails_instead_of_hanging(tmp_path):
    prefix = write_prefix(tmp_path, "a", 30)
    write_languages(prefix, [0] * 20 + [1] * 10, ["python", "rust"])
    config = DataConfig(prefixes=[prefix], split="2,1,0", languages=["rust"])  # rust only in the valid range
    with pytest.raises(ValueError, match="train split of .* has no documents in languages \\['rust'\\]"):
        build(tmp_path, config)


def test_mock_data_is_megatron_mock_dataset(tmp_path):
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    train, valid, test = build(tmp_path, DataConfig(mock=True), train_samples=10, valid_samples=2, test_samples=2)
    assert isinstance(train, MockGPTDataset) and isinstance(test, MockGPTDataset)
    sample = train[0]
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_config_checks_name_the_keys():
    problems = check_data_config(DataConfig(prefixes=["x", "y"], weights=[1.0], split="a,b",
                                            reset_attention_mask=True))
    text = "\n".join(problems)
    assert "data.weights has 1 entries for 2 data.prefixes" in text
    assert "data.split must look like" in text
    assert "data.reset_attention_mask needs data.create_attention_mask" in text
    assert check_data_config(DataConfig()) == ["data.prefixes is empty: give indexed dataset prefixes, or set "
                                               "data.mock=true"]
    assert check_data_config(DataConfig(mock=True)) == []
    assert parse_split("98,1,1") == pytest.approx([0.98, 0.01, 0.01])
    assert parse_split("3") == [1.0, 0.0, 0.0]


def test_missing_prefix_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.bin not found"):
        build(tmp_path, DataConfig(prefixes=[str(tmp_path / "nothere")]))
