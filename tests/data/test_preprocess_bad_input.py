"""Bad input: every bad line is reported and skipped, all good documents kept; strict mode; dying workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from betterai_megatron.data.preprocess import PreprocessConfig, run_preprocess
from betterai_megatron.data.preprocess.pool import WorkerDeathError, WorkerError
from betterai_megatron.data.preprocess.run import StrictModeError
from betterai_megatron.data.preprocess.worker import FAULT_ENV

try:
    import test_preprocess_support as support
except ImportError:
    from tests.data import test_preprocess_support as support

code_model = support.code_model
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)  # a hang fails the test instead of blocking the suite

GOOD = [json.dumps({"text": f"def ok{i}():\n    return {i}\n"}) for i in range(12)]
# (raw line bytes, expected reason prefix)
BAD = [
    (b'{"text": "unterminated', "malformed JSON"),
    (b'{"txt": "wrong key"}', "missing key 'text'"),
    (b'{"text": null}', "key 'text' is null"),
    (b'{"text": 42}', "key 'text' is int"),
    (b'{"text": ["ok", 7]}', "key 'text': item 1 is int"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    (b'{"text": "lone \\ud800 surrogate"}', "lone surrogate"),
    (b"", "blank line"),
    (b"   \t", "blank line"),
    (b"[1, 2]", "not a JSON object"),
]


def _mixed_file(tmp_path: Path) -> tuple[Path, list[str], dict[int, str]]:
    """GOOD lines with a BAD line after every good one; returns path, good lines, {line number: reason}."""
    lines, good, expected = [], [], {}
    for i, line in enumerate(GOOD):
        lines.append(line.encode())
        good.append(line)
        if i < len(BAD):
            raw, reason = BAD[i]
            lines.append(raw)
            expected[len(lines)] = reason
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, good, expected


def _config(tmp_path: Path, model: str, path: Path, **overrides) -> PreprocessConfig:
    settings = {"output_prefix": str(tmp_path / "out"), "inputs": [str(path)], "tokenizer_model": model,
                "append_eod": True, "workers": 2, "batch_bytes": 64, "progress": False}
    settings.update(overrides)
    return PreprocessConfig(**settings)


def test_bad_lines_are_reported_skipped_and_good_documents_kept(code_model, tmp_path):
    path, good, expected = _mixed_file(tmp_path)
    summary = run_preprocess(_config(tmp_path, code_model, path))
    assert summary["rejected"] == len(BAD) and summary["documents"] == len(GOOD)
    reference = support.reference_outputs(good, code_model, tmp_path / "ref")
    assert support.output_bytes(str(tmp_path / "out")) == reference["text"]
    rejected = [json.loads(line) for line in Path(f"{tmp_path}/out.rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == sorted(expected)
    for record in rejected:
        assert record["file"] == str(path)
        assert record["reason"].startswith(expected[record["line"]]), record


def test_strict_mode_stops_at_the_first_bad_line_and_writes_nothing(code_model, tmp_path):
    path, _, expected = _mixed_file(tmp_path)
    with pytest.raises(StrictModeError) as error:
        run_preprocess(_config(tmp_path, code_model, path, strict=True))
    first = min(expected)
    assert error.value.line == first and error.value.reason.startswith(expected[first])
    assert str(error.value).startswith(f"{path}:{first}:")
    assert sorted(os.listdir(tmp_path)) == ["mixed.jsonl"]  # no partial output, no temporaries


def test_strict_cli_exit_code_2_and_earlier_outputs_untouched(code_model, tmp_path):
    path, _, expected = _mixed_file(tmp_path)
    old = tmp_path / "out_text_document.bin"
    old.write_bytes(b"previous good output")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(path), "--output-prefix",
         str(tmp_path / "out"), "--tokenizer-model", code_model, "--workers", "1", "--strict"],
        capture_output=True, text=True, timeout=200, check=False)
    assert result.returncode == 2, result.stderr
    assert f"{path}:{min(expected)}:" in result.stderr
    assert old.read_bytes() == b"previous good output"
    assert sorted(os.listdir(tmp_path)) == ["mixed.jsonl", "out_text_document.bin"]


def test_a_worker_that_dies_loses_only_its_document(code_model, tmp_path, monkeypatch):
    lines = GOOD[:5] + [json.dumps({"text": "KILL-THIS-WORKER\n"})] + GOOD[5:]
    path = support.write_jsonl(tmp_path / "in.jsonl", lines)
    monkeypatch.setenv(FAULT_ENV, "exit:KILL-THIS-WORKER")
    summary = run_preprocess(_config(tmp_path, code_model, path, batch_bytes=200))
    assert summary["worker_deaths"] >= 2  # the batch, then the document alone
    assert summary["rejected"] == 1 and summary["documents"] == len(GOOD)
    reference = support.reference_outputs(GOOD, code_model, tmp_path / "ref")
    assert support.output_bytes(str(tmp_path / "out")) == reference["text"]
    (rejected,) = [json.loads(x) for x in Path(f"{tmp_path}/out.rejected.jsonl").read_text().splitlines()]
    assert rejected["line"] == 6 and "worker process died" in rejected["reason"]


def test_workers_that_keep_dying_stop_the_run_without_output(code_model, tmp_path, monkeypatch):
    path = support.write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": f"DIE {i}"}) for i in range(10)])
    monkeypatch.setenv(FAULT_ENV, "exit:DIE")
    with pytest.raises(WorkerDeathError):
        run_preprocess(_config(tmp_path, code_model, path, max_worker_deaths=3))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_a_worker_exception_fails_fast_without_output(code_model, tmp_path, monkeypatch):
    path = support.write_jsonl(tmp_path / "in.jsonl", GOOD + [json.dumps({"text": "BUG"})])
    monkeypatch.setenv(FAULT_ENV, "raise:BUG")
    with pytest.raises(WorkerError, match="injected fault"):
        run_preprocess(_config(tmp_path, code_model, path))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_line_endings_and_bom_are_read_like_python_text_mode(code_model, tmp_path):
    # Megatron-LM iterates a text-mode file: "\r\n" and a lone "\r" end lines too.
    body = "\r\n".join(GOOD[:4]) + "\r" + "\n".join(GOOD[4:8]) + "\r\n"
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(body.encode())
    summary = run_preprocess(_config(tmp_path, code_model, path, batch_bytes=37))  # blocks end mid "\r\n"
    assert summary["rejected"] == 0
    reference = support.reference_outputs(support.text_mode_lines(path), code_model, tmp_path / "ref")
    assert support.output_bytes(str(tmp_path / "out")) == reference["text"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(GOOD[:3]).encode())  # no final newline either
    summary = run_preprocess(_config(tmp_path, code_model, bom, output_prefix=str(tmp_path / "bom")))
    assert summary["rejected"] == 0
    assert support.output_bytes(str(tmp_path / "bom")) == support.reference_outputs(
        GOOD[:3], code_model, tmp_path / "bomref")["text"]
