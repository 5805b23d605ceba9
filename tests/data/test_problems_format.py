"""The problems jsonl format: round trip, and every bad line reported with file:line and the reason."""

from __future__ import annotations

import gzip
import json

import pytest

from betterai_megatron.data.problems import (
    Problem,
    ProblemFormatError,
    label_to_level,
    level_to_label,
    load_problems,
    read_problems_jsonl,
    write_problems_jsonl,
)

GOOD = {"task_id": "t/1", "prompt": "def f(x):\n", "tests": "def check(candidate):\n    assert candidate(1) == 2\n",
        "entry_point": "f"}


def _problems() -> list[Problem]:
    return [Problem(**GOOD, canonical_solution="    return x + 1\n", difficulty="easy", level=1,
                    test_cases=["assert candidate(1) == 2"], metadata={"family": "x", "params": {"k": 1}}),
            Problem(task_id="t/2", prompt="p", tests="t", entry_point="g", language="javascript",
                    setup_code="var helper = 1;", source="unit")]


@pytest.mark.parametrize("name", ["problems.jsonl", "problems.jsonl.gz"])
def test_round_trip(tmp_path, name):
    path = tmp_path / name
    assert write_problems_jsonl(path, _problems()) == 2
    assert read_problems_jsonl(path) == _problems()
    assert load_problems(str(path)) == _problems()
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as handle:
            assert json.loads(handle.readline())["task_id"] == "t/1"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def _write_lines(tmp_path, lines: list[str]):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line, message", [
    ('{"task_id": "t/2", "prompt": ', r"bad\.jsonl:3: malformed JSON"),
    ('[1, 2]', r"bad\.jsonl:3: expected a JSON object, got list"),
    (json.dumps({**GOOD, "task_id": "t/2", "entry_pont": "f"}),
     r"bad\.jsonl:3: unknown key 'entry_pont' \(did you mean 'entry_point'\?\)"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "tests"}), r"bad\.jsonl:3: missing required key\(s\) tests"),
    (json.dumps({**GOOD, "task_id": "t/2", "level": "3"}), r"bad\.jsonl:3: level must be an integer"),
    (json.dumps({**GOOD, "task_id": "t/2", "level": 9}), r"bad\.jsonl:3: level must be an integer in \[0, 5\]"),
    (json.dumps({**GOOD, "task_id": "t/2", "language": "cobol"}), r"bad\.jsonl:3: language must be one of"),
    (json.dumps({**GOOD, "task_id": "t/2", "difficulty": "trivial"}), r"bad\.jsonl:3: difficulty must be one of"),
    (json.dumps({**GOOD, "task_id": "t/2", "test_cases": []}), r"bad\.jsonl:3: test_cases must not be an empty"),
    (json.dumps({**GOOD, "task_id": "t/2", "test_cases": [1]}), r"bad\.jsonl:3: test_cases must be a list of str"),
    (json.dumps(GOOD), r"bad\.jsonl:3: duplicate task_id 't/1' \(first at line 1\)"),
])
def test_bad_lines_name_file_line_and_reason(tmp_path, bad_line, message):
    path = _write_lines(tmp_path, [json.dumps(GOOD), "", bad_line])  # a blank line is fine
    with pytest.raises(ProblemFormatError, match=message):
        read_problems_jsonl(path)


def test_missing_file_and_unknown_set(tmp_path):
    with pytest.raises(ProblemFormatError, match="cannot open"):
        read_problems_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="unknown problem set"):
        load_problems("absent-set")


def test_level_and_label_mapping():
    assert [level_to_label(level) for level in range(6)] == ["unknown", "easy", "easy", "medium", "hard", "hard"]
    assert [label_to_level(label) for label in ("Easy", "medium", "HARD", "unknown")] == [2, 3, 4, 0]
