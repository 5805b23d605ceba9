"""SFT data: schemas, readers and their errors, loss masks and packing of the built datasets, determinism."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from betterai_megatron.data.packing import block_causal_attention_mask
from betterai_megatron.data.sft_dataset import (
    PackedSftDataset,
    RecordError,
    SftDataConfig,
    build_sft_datasets,
    iter_records,
    load_conversations,
    record_to_messages,
    split_train_valid,
)

try:
    import test_sft_support as support
except ImportError:  # tests/ made a package
    from tests.data import test_sft_support as support

CharTokenizer = support.CharTokenizer
sp_tokenizer = support.sp_tokenizer  # a fixture


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------ schemas

def test_magicoder_oss_instruct_record():
    record = {"lang": "python", "seed": "...", "problem": "Write add.", "solution": "def add(a, b): return a + b",
              "index": 7}
    assert record_to_messages(record) == [{"role": "user", "content": "Write add."},
                                          {"role": "assistant", "content": "def add(a, b): return a + b"}]
    assert record_to_messages(record, format="magicoder") == record_to_messages(record)


def test_code_feedback_messages_record():
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert record_to_messages({"id": 3, "messages": turns}) == turns


def test_sharegpt_and_custom_prompt_response_fields():
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}
    assert [t["role"] for t in record_to_messages(record)] == ["system", "user", "assistant"]
    custom = {"question_text": "q", "answer_code": "a", "sys": "be terse"}
    assert record_to_messages(custom, format="prompt_response", prompt_field="question_text",
                              response_field="answer_code", system_field="sys") == [
        {"role": "system", "content": "be terse"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"}]
    assert record_to_messages({"instruction": "i", "response": "r"})[1]["content"] == "r"  # Evol-Instruct


@pytest.mark.parametrize("record, format, match", [
    ({"text": "x"}, "auto", "cannot tell the schema from keys \\['text'\\]"),
    ({"problem": "x"}, "magicoder", "missing key 'solution'"),
    ({"problem": 3, "solution": "s"}, "magicoder", "key 'problem' must be a string, got int"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "unknown speaker 'bot'"),
    ({"messages": "not a list"}, "messages", "must be a list"),
])
def test_schema_errors_name_the_key(record, format, match):
    with pytest.raises((KeyError, ValueError), match=match):
        record_to_messages(record, format=format)


# ------------------------------------------------------------------------------------------------ readers

def test_bad_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a", \n{"prompt": "c"}\n\xff\xfe\n'
                     b'{"prompt": "d", "response": "e"}\n')
    with pytest.raises(RecordError, match=f"{path}:3: malformed JSON"):
        load_conversations([str(path)], config=SftDataConfig())
    kept = load_conversations([str(path)], config=SftDataConfig(skip_bad_records=True))
    assert [location for location, _ in kept] == [f"{path}:1", f"{path}:6"]
    locations = [(loc, isinstance(rec, RecordError)) for loc, rec in iter_records(path)]
    assert locations == [(f"{path}:1", False), (f"{path}:3", True), (f"{path}:4", False), (f"{path}:5", True),
                         (f"{path}:6", False)]
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "response": "b"}\n\n\n{"prompt": "c"}\n')
    with pytest.raises(RecordError, match=f"{missing}:4: missing key 'response'"):
        load_conversations([str(missing)], config=SftDataConfig(format="prompt_response"))


def test_parquet_gzip_json_array_and_saved_dataset_dirs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"p{i}", "solution": f"s{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:2])
    write_jsonl(folder / "b.jsonl", rows[2:])
    for source in ("m.parquet", "m.jsonl.gz", "m.json", "saved", "folder"):
        conversations = load_conversations([str(tmp_path / source)], config=SftDataConfig())
        assert [m[1]["content"] for _, m in conversations] == ["s0", "s1", "s2"], source
    assert [loc for loc, _ in iter_records(tmp_path / "m.parquet")][2] == f"{tmp_path / 'm.parquet'}:row 2"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(iter_records(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unsupported data file"):
        (tmp_path / "x.csv").write_text("a,b\n")
        list(iter_records(tmp_path / "x.csv"))


# ------------------------------------------------------------------------------------------------ datasets

def conversations_file(tmp_path, count=40, seed=0):
    rng = np.random.default_rng(seed)
    words = "def return value list sort numbers print the result of code".split()
    records = []
    for i in range(count):
        answer = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        if i % 3 == 0:
            records.append({"messages": [{"role": "user", "content": f"task {i}"},
                                         {"role": "assistant", "content": answer},
                                         {"role": "user", "content": "again"},
                                         {"role": "assistant", "content": f"sorted {i}"}]})
        else:
            records.append({"problem": f"task {i}", "solution": answer})
    return write_jsonl(tmp_path / "sft.jsonl", records), records


def assistant_answers(record):
    if "messages" in record:
        return [t["content"] for t in record["messages"] if t["role"] == "assistant"]
    return [record["solution"]]


def test_packed_epoch_trains_exactly_the_assistant_tokens(tmp_path, sp_tokenizer):
    path, records = conversations_file(tmp_path)
    config = SftDataConfig(paths=[str(path)], valid_fraction=0.2)
    train, valid = build_sft_datasets(config=config, tokenizer=sp_tokenizer, seq_length=64, seed=5)
    trained_texts = []
    for dataset in (train, valid):
        for index in range(len(dataset)):
            sample = dataset[index]
            cu = sample["cu_seqlens"][sample["cu_seqlens"] >= 0].tolist()
            assert cu[0] == 0 and cu[-1] == 64
            for start, end in zip(cu[:-1], cu[1:]):
                assert sample["position_ids"][start:end].tolist() == list(range(end - start))
                labels, mask = sample["labels"][start:end], sample["loss_mask"][start:end]
                if mask.any():  # a document (padding segments have no loss)
                    span = sp_tokenizer.detokenize(labels[mask.bool()].tolist())
                    trained_texts.append(span)
            # shifted labels: within a document the next input token is the label
            for start, end in zip(cu[:-1], cu[1:]):
                assert torch.equal(sample["tokens"][start + 1:end], sample["labels"][start:end - 1])
    expected = sorted("".join(a + "<|im_end|>" for a in assistant_answers(r)) for r in records)
    assert sorted(trained_texts) == expected
    # loss-token count equals the hand count: tokens of each answer plus one <|im_end|> per assistant turn
    total = sum(float(d[i]["loss_mask"].sum()) for d in (train, valid) for i in range(len(d)))
    assert total == sum(len(sp_tokenizer.tokenize(a)) + 1 for r in records for a in assistant_answers(r))


def test_train_valid_split_is_seeded_disjoint_and_complete():
    train, valid = split_train_valid(50, valid_fraction=0.1, seed=3)
    assert len(valid) == 5 and len(train) == 45
    assert sorted([*train, *valid]) == list(range(50))
    again = split_train_valid(50, valid_fraction=0.1, seed=3)
    assert np.array_equal(again[1], valid)
    assert not np.array_equal(split_train_valid(50, valid_fraction=0.1, seed=4)[1], valid)
    assert len(split_train_valid(3, valid_fraction=0.01, seed=0)[1]) == 1  # at least one when asked for
    assert len(split_train_valid(3, valid_fraction=0.0, seed=0)[1]) == 0


def test_same_seed_same_samples_and_epochs_reshuffle(tmp_path, sp_tokenizer):
    path, _ = conversations_file(tmp_path)
    config = SftDataConfig(paths=[str(path)], valid_fraction=0.0)
    first, _ = build_sft_datasets(config=config, tokenizer=sp_tokenizer, seq_length=48, seed=1, train_samples=40)
    second, _ = build_sft_datasets(config=config, tokenizer=sp_tokenizer, seq_length=48, seed=1, train_samples=40)
    other, _ = build_sft_datasets(config=config, tokenizer=sp_tokenizer, seq_length=48, seed=2, train_samples=40)
    assert len(first) == 40
    for index in range(40):
        assert torch.equal(first[index]["tokens"], second[index]["tokens"])
    assert any(not torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(len(first.bins)))
    bins_per_epoch = len(first.bins)
    epoch0 = [tuple(first.bin_for(i)) for i in range(bins_per_epoch)]
    epoch1 = [tuple(first.bin_for(i)) for i in range(bins_per_epoch, min(2 * bins_per_epoch, 40))]
    assert sorted(epoch0) == sorted(map(tuple, first.bins))  # each packed sequence once per epoch
    assert len(set(epoch1)) == len(epoch1)


def test_attention_mask_option_blocks_other_documents(sp_tokenizer):
    docs = [(np.array([5, 6, 7, 8]), np.array([0, 1, 1, 1], dtype=np.float32)),
            (np.array([9, 10, 11]), np.array([0, 0, 1], dtype=np.float32))]
    dataset = PackedSftDataset(docs, seq_length=8, pad_token_id=0, seed=0, create_attention_mask=True)
    sample = dataset[0]
    assert sample["attention_mask"].shape == (1, 8, 8)
    assert torch.equal(sample["attention_mask"], block_causal_attention_mask(sample["cu_seqlens"], 8))
    assert sample["cu_seqlens"].shape == (dataset.cu_seqlens_width,)
    # the second document (positions 3..4) cannot see the first (0..2)
    first, second = (0, 3), (3, 5)
    assert sample["attention_mask"][0, second[0]:second[1], first[0]:first[1]].all()


def test_overlong_conversations_are_truncated_or_dropped(tmp_path):
    records = [{"prompt": "p", "response": "x" * 40}, {"prompt": "p" * 60, "response": "y"},
               {"prompt": "q", "response": "z"}]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    tokenizer = CharTokenizer()
    kwargs = dict(tokenizer=tokenizer, seq_length=32, seed=0)
    train, _ = build_sft_datasets(config=SftDataConfig(paths=[str(path)], valid_fraction=0.0), **kwargs)
    # One token per character. Record 0 is 61 tokens: <|im_start|> 'user\n' 'p' <|im_end|> '\n' <|im_start|>
    # 'assistant\n' = 20 tokens, then 40 'x', then <|im_end|>; truncated to seq_length + 1 = 33 tokens it keeps
    # 13 'x' to train on. Record 1's answer is cut off entirely: nothing to train on, dropped. Record 2 is 22
    # tokens and trains on 'z' and <|im_end|>.
    assert (train.stats.truncated, train.stats.dropped_no_target, train.stats.dropped_overlong) == (2, 1, 0)
    assert sum(float(train[i]["loss_mask"].sum()) for i in range(len(train))) == 13 + 2
    dropped, _ = build_sft_datasets(config=SftDataConfig(paths=[str(path)], valid_fraction=0.0, overlong="drop"),
                                    **kwargs)
    assert (dropped.stats.dropped_overlong, len(dropped.documents)) == (2, 1)


def test_a_bad_conversation_is_reported_with_its_line(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"},
                                                 {"messages": [{"role": "user", "content": "a"},
                                                               {"role": "wizard", "content": "b"}]}])
    with pytest.raises(RecordError, match=f"{path}:2: turn 1: role must be one of"):
        build_sft_datasets(config=SftDataConfig(paths=[str(path)]), tokenizer=sp_tokenizer, seq_length=32, seed=0)
