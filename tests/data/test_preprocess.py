"""Preprocessing output equals Megatron-LM's algorithm (plain reference), byte for byte; inputs and schemas."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from betterai_megatron.data.languages import LANGUAGE_IDS
from betterai_megatron.data.preprocess import PreprocessConfig, run_preprocess

try:
    import test_preprocess_support as support
except ImportError:
    from tests.data import test_preprocess_support as support

code_model = support.code_model
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def _records(tmp_path: Path) -> list[dict]:
    texts = support.stdlib_texts(tmp_path, max_files=30)
    records = [{"text": t, "lang": "python"} for t in texts]
    records += [
        {"text": "", "lang": "python"},  # empty document: kept, zero sequences
        {"text": ["first sentence.", "", "second\n"], "lang": "Python"},  # pre-split sentences, one empty
        {"text": "fn main() {\n    println!(\"hi\");\n}\n", "lang": "Rust"},
        {"text": "λ é 🙂\n\ttab", "lang": "C++", "other": 1},
        {"text": [], "lang": "python"},  # no sentence at all
    ]
    return records


def _run(tmp_path: Path, model: str, inputs: list[str], name: str = "out", **overrides) -> tuple[str, dict]:
    prefix = str(tmp_path / name)
    config = PreprocessConfig(output_prefix=prefix, inputs=inputs, tokenizer_model=model, append_eod=True,
                              workers=2, batch_bytes=64 << 10, progress=False, **overrides)
    return prefix, run_preprocess(config)


def test_output_is_byte_identical_to_the_reference_and_reads_back(code_model, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = support.write_jsonl(tmp_path / "in.jsonl", _records(tmp_path))
    prefix, summary = _run(tmp_path, code_model, [str(path)])
    reference = support.reference_outputs(support.text_mode_lines(path), code_model, tmp_path / "ref")
    assert support.output_bytes(prefix) == reference["text"]
    # read back through megatron-core: each document = the tokenizer's encoding + eod
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=code_model)
    dataset = IndexedDataset(f"{prefix}_text_document")
    records = [json.loads(line) for line in support.text_mode_lines(path)]
    assert len(dataset.document_indices) - 1 == len(records) == summary["documents"]
    for d, record in enumerate(records):
        sentences = record["text"] if isinstance(record["text"], list) else [record["text"]]
        expected = [i for s in sentences for i in sp.encode_as_ids(s)]
        expected += [sp.eos_id()] if expected else []
        first, last = dataset.document_indices[d], dataset.document_indices[d + 1]
        got = [t for s in range(first, last) for t in dataset[s].tolist()]
        assert got == expected
    assert summary["empty_documents"] == sum(1 for r in records if r["text"] in ("", []))


def test_idx_layout_matches_the_documented_format(code_model, tmp_path):
    path = support.write_jsonl(tmp_path / "in.jsonl", _records(tmp_path))
    prefix, _ = _run(tmp_path, code_model, [str(path)])
    bin_bytes, idx_bytes = support.output_bytes(prefix)
    fields = support.parse_idx(idx_bytes)
    assert fields["version"] == 1 and fields["dtype_code"] == 8  # uint16 for a 700-piece vocabulary
    assert fields["trailing_bytes"] == 0
    lengths = fields["lengths"].astype(np.int64)
    assert fields["pointers"].tolist() == (np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).tolist()
    assert int(lengths.sum()) * 2 == len(bin_bytes)
    records = support.text_mode_lines(path)
    assert len(fields["document_indices"]) == len(records) + 1
    assert fields["document_indices"][-1] == len(lengths)
    assert np.all(np.diff(fields["document_indices"]) >= 0)


def test_several_json_keys_each_match_the_reference(code_model, tmp_path):
    rows = [{"text": f"def f{i}():\n    return {i}\n", "doc": f"# doc {i}\n" * (i % 3)} for i in range(40)]
    path = support.write_jsonl(tmp_path / "in.jsonl", rows)
    prefix, _ = _run(tmp_path, code_model, [str(path)], json_keys=("text", "doc"))
    reference = support.reference_outputs(support.text_mode_lines(path), code_model, tmp_path / "ref",
                                          keys=("text", "doc"))
    for key in ("text", "doc"):
        assert support.output_bytes(prefix, key) == reference[key]


def test_partitions_reproduce_megatron_order(code_model, tmp_path):
    lines = [json.dumps({"text": f"x{i} = {i}\n" * (1 + i % 4)}) for i in range(23)]
    path = support.write_jsonl(tmp_path / "in.jsonl", lines)
    prefix, _ = _run(tmp_path, code_model, [str(path)], partitions=3)
    # Megatron-LM: line i goes to partition i % 3; partitions are concatenated in order
    order = [lines[i] for p in range(3) for i in range(p, len(lines), 3)]
    assert support.output_bytes(prefix) == support.reference_outputs(order, code_model, tmp_path / "rr")["text"]
    sequential, _ = _run(tmp_path, code_model, [str(path)], name="seq", partitions=3, keep_sequential_samples=True)
    assert support.output_bytes(sequential) == support.reference_outputs(lines, code_model, tmp_path / "s")["text"]
    assert not [p for p in os.listdir(tmp_path) if ".part" in p or ".tmp" in p]  # temporaries removed


def test_language_filter_sidecars_and_counts(code_model, tmp_path):
    rows = [{"text": "print(1)\n", "lang": "Python"}, {"text": "fn a() {}\n", "lang": "rust"},
            {"text": "int x;\n", "lang": "C++"}, {"text": "y = 2\n", "lang": "python"}, {"text": "?\n"}]
    path = support.write_jsonl(tmp_path / "in.jsonl", rows)
    prefix, summary = _run(tmp_path, code_model, [str(path)], languages=frozenset({"python", "cpp"}))
    kept = [json.dumps(r) for r in rows if r.get("lang", "").lower() in ("python", "c++")]
    assert support.output_bytes(prefix) == support.reference_outputs(kept, code_model, tmp_path / "ref")["text"]
    ids = np.load(f"{prefix}_text_document.lang.npy")
    assert ids.tolist() == [LANGUAGE_IDS["python"], LANGUAGE_IDS["cpp"], LANGUAGE_IDS["python"]]
    names = json.loads(Path(f"{prefix}_text_document.languages.json").read_text())
    assert names == {str(LANGUAGE_IDS["python"]): "python", str(LANGUAGE_IDS["cpp"]): "cpp"}
    assert summary["languages"]["python"]["documents"] == 2
    assert summary["filtered_by_language"] == {"rust": 1, "unknown": 1}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=code_model)
    assert summary["languages"]["cpp"]["tokens"]["text"] == len(sp.encode_as_ids("int x;\n")) + 1


def test_gzip_and_parquet_inputs_give_the_same_bytes(code_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"content": f"def g{i}(a):\n    return a * {i}\n", "lang": "Python"} for i in range(50)]
    plain = support.write_jsonl(tmp_path / "stack.jsonl", records)
    with open(plain, "rb") as source, gzip.open(tmp_path / "stack.jsonl.gz", "wb") as target:
        target.write(source.read())
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "stack.parquet")
    reference = support.reference_outputs([json.dumps({"text": r["content"]}) for r in records], code_model,
                                          tmp_path / "ref")["text"]
    for name in ("stack.jsonl", "stack.jsonl.gz", "stack.parquet"):
        prefix, summary = _run(tmp_path, code_model, [str(tmp_path / name)], name=name, schema="the-stack")
        assert support.output_bytes(prefix) == reference, name
        assert summary["languages"]["python"]["documents"] == 50


def test_local_datasets_directory(code_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"v = {i}\n" for i in range(20)], "lang": ["python"] * 20}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    prefix = str(tmp_path / "hf")
    run_preprocess(PreprocessConfig(output_prefix=prefix, hf_dataset=str(tmp_path / "ds"), tokenizer_model=code_model,
                                    append_eod=True, workers=1, progress=False))
    lines = [json.dumps({"text": t}) for t in rows["text"]]
    assert support.output_bytes(prefix) == support.reference_outputs(lines, code_model, tmp_path / "r")["text"]


def test_source_tree_languages_order_and_rejections(code_model, tmp_path):
    tree = tmp_path / "repo"
    (tree / "pkg").mkdir(parents=True)
    (tree / ".git").mkdir()
    files = {"b.py": "print('b')\n", "a.js": "console.log(1);\n", "pkg/m.rs": "fn m() {}\n",
             "README": "no extension: skipped\n", ".git/x.py": "hidden\n"}
    for name, text in files.items():
        (tree / name).write_text(text)
    (tree / "blob.py").write_bytes(b"\x00\x01binary")
    (tree / "latin.py").write_bytes("é = 1\n".encode("latin-1"))
    prefix = str(tmp_path / "tree")
    summary = run_preprocess(PreprocessConfig(output_prefix=prefix, input_dir=str(tree),
                                              tokenizer_model=code_model, append_eod=True, workers=2,
                                              progress=False))
    ordered = ["a.js", "b.py", "pkg/m.rs"]  # sorted by relative path; binary / undecodable files rejected
    lines = [json.dumps({"text": files[name]}) for name in ordered]
    assert support.output_bytes(prefix) == support.reference_outputs(lines, code_model, tmp_path / "r")["text"]
    ids = np.load(f"{prefix}_text_document.lang.npy").tolist()
    assert ids == [LANGUAGE_IDS["javascript"], LANGUAGE_IDS["python"], LANGUAGE_IDS["rust"]]
    rejected = [json.loads(line) for line in Path(f"{prefix}.rejected.jsonl").read_text().splitlines()]
    assert {(r["file"], r["reason"].split(" ")[0]) for r in rejected} == {("blob.py", "binary"),
                                                                          ("latin.py", "invalid")}
    assert summary["rejected"] == 2


@pytest.mark.parametrize("schema, record, expected_text, expected_language", [
    ("magicoder", {"problem": "Write add.", "solution": "```python\ndef add(a, b): ...\n```", "lang": "python"},
     "Write add.\n\n```python\ndef add(a, b): ...\n```", "python"),
    ("code-feedback", {"id": 1, "messages": [{"role": "user", "content": "Sort it"},
                                             {"role": "assistant", "content": "```js\nx.sort()\n```"}]},
     "Sort it\n\n```js\nx.sort()\n```", "javascript"),
    ("codeultrafeedback", {"instruction": "Reverse a list", "preference": "efficiency", "models": ["a", "b"],
                           "responses": [{"model": "a", "response": "bad"}, {"model": "b", "response": "```rust\nv.reverse()\n```"}],
                           "annotations": [{"model": "a", "rating": "2", "rationale": ""},
                                           {"model": "b", "rating": "5", "rationale": ""}]},
     "Reverse a list\n\n```rust\nv.reverse()\n```", "rust"),
])
def test_schema_field_mapping(code_model, tmp_path, schema, record, expected_text, expected_language):
    path = support.write_jsonl(tmp_path / "in.jsonl", [record])
    prefix, summary = _run(tmp_path, code_model, [str(path)], schema=schema)
    reference = support.reference_outputs([json.dumps({"text": expected_text})], code_model, tmp_path / "r")
    assert support.output_bytes(prefix) == reference["text"]
    assert list(summary["languages"]) == [expected_language]


def test_huggingface_tokenizer_preprocessing(tmp_path):
    pytest.importorskip("transformers")
    rows = [{"text": f"def h{i}(x):\n    return x - {i}\n"} for i in range(30)] + [{"text": ""}]
    path = support.write_jsonl(tmp_path / "in.jsonl", rows)
    model = support.hf_tokenizer_dir(tmp_path / "hf", [r["text"] for r in rows] * 5)
    prefix, _ = _run(tmp_path, model, [str(path)], tokenizer_type="HuggingFaceTokenizer")
    reference = support.reference_outputs(support.text_mode_lines(path), model, tmp_path / "ref", hf=True)
    assert support.output_bytes(prefix) == reference["text"]


def test_torch_free_megatron_writer_writes_the_same_bytes_as_the_imported_one(tmp_path):
    from megatron.core.datasets import indexed_dataset as imported

    from betterai_megatron.data.preprocess.mcore_indexed import load_without_torch

    loaded = load_without_torch()
    assert loaded is not imported and loaded.IndexedDatasetBuilder is not imported.IndexedDatasetBuilder
    documents = [([5, 6, 7], [3]), ([], []), ([1, 2, 3, 4], [1, 3]), ([9], [1])]
    for name, module in (("loaded", loaded), ("imported", imported)):
        for part in (0, 1):
            builder = module.IndexedDatasetBuilder(str(tmp_path / f"{name}{part}.bin"), dtype=np.uint16)
            for tokens, lengths in documents[part::2]:
                builder.add_document(np.array(tokens, dtype=np.int32), lengths)
            builder.finalize(str(tmp_path / f"{name}{part}.idx"))
        merged = module.IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
        merged.add_index(str(tmp_path / f"{name}0"))
        merged.add_index(str(tmp_path / f"{name}1"))
        merged.finalize(str(tmp_path / f"{name}.idx"))
    for suffix in ("0.bin", "0.idx", ".bin", ".idx"):
        assert (tmp_path / f"loaded{suffix}").read_bytes() == (tmp_path / f"imported{suffix}").read_bytes()


def test_cli_end_to_end_writes_the_same_bytes(code_model, tmp_path):
    path = support.write_jsonl(tmp_path / "in.jsonl", _records(tmp_path))
    prefix = tmp_path / "cli"
    # The CLI's process never imports torch: megatron-core's writer is loaded without it (mcore_indexed).
    script = ("import sys; from betterai_megatron.data.preprocess.cli import cli; rc = cli(sys.argv[1:]); "
              "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    result = subprocess.run(
        [sys.executable, "-c", script, "--input", str(path), "--output-prefix",
         str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", code_model,
         "--workers", "2", "--append-eod"], capture_output=True, text=True, timeout=240, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout
    reference = support.reference_outputs(support.text_mode_lines(path), code_model, tmp_path / "ref")
    assert support.output_bytes(str(prefix)) == reference["text"]
    assert "docs/s" in result.stderr and "tokens/s" in result.stderr and "MB/s" in result.stderr
    summary = json.loads(Path(f"{prefix}.summary.json").read_text())
    assert summary["rejected"] == 0 and summary["documents"] == len(support.text_mode_lines(path))


def test_progress_reports_documents_tokens_and_megabytes_per_second():
    import io

    from betterai_megatron.data.preprocess.progress import Progress

    log = io.StringIO()
    progress = Progress(total_bytes=0, live=False, log_interval=10, stream=log)
    for _ in range(5):
        progress.update(documents=4, tokens=1000, input_bytes=2_000_000)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # at 12 and 20 documents: once per 10 documents
    assert all("docs/s" in line and "tokens/s" in line and "MB/s" in line for line in lines)
    live = io.StringIO()
    bar = Progress(total_bytes=10_000_000, live=True, log_interval=10, stream=live)
    bar.update(documents=1, tokens=10, input_bytes=5_000_000)
    bar.close()
    assert "50.0%" in live.getvalue() and live.getvalue().endswith("\n")


def test_cli_flags_megatron_has_but_we_do_not_fail_clearly(tmp_path):
    import argparse

    from betterai_megatron.data.preprocess.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--input", "x.jsonl", "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", "m.model"]
    with pytest.raises(ValueError, match="split-sentences"):
        config_from_args(parser.parse_args([*base, "--split-sentences"]))
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        config_from_args(parser.parse_args([*base, "--languages", "python,klingon"]))
    config = config_from_args(parser.parse_args([*base, "--languages", "Python,C++", "--workers", "3"]))
    assert config.languages == frozenset({"python", "cpp"}) and config.workers == 3
