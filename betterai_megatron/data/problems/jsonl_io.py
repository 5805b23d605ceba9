"""Read and write problems files: one :class:`Problem` per JSON line (``.jsonl`` or ``.jsonl.gz``).

Reading is strict, because a silently skipped problem changes a benchmark score: every bad line raises
:class:`ProblemFormatError` with ``file:line`` and the reason (malformed JSON, a missing or unknown key -- with
the closest valid key --, a wrong type, a duplicate ``task_id`` -- naming both lines). Blank lines are allowed.
"""

from __future__ import annotations

import difflib
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from betterai_megatron.data.problems.problem import PROBLEM_FIELDS, REQUIRED_FIELDS, Problem


class ProblemFormatError(ValueError):
    """A problems file breaks the format; the message starts with ``file:line:``."""


def _open_text(path: Path, mode: str, *, gz: bool | None = None) -> io.TextIOBase:
    if path.suffix == ".gz" if gz is None else gz:
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def problem_from_dict(record: object, *, where: str) -> Problem:
    """Build and validate a :class:`Problem` from one decoded JSON value; errors start with ``where``."""
    if not isinstance(record, dict):
        raise ProblemFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in record:
        if key not in PROBLEM_FIELDS:
            close = difflib.get_close_matches(str(key), PROBLEM_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ProblemFormatError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(PROBLEM_FIELDS)}")
    missing = [key for key in REQUIRED_FIELDS if key not in record]
    if missing:
        raise ProblemFormatError(f"{where}: missing required key(s) {', '.join(missing)}")
    values = {key: value for key, value in record.items()}
    for key in ("setup_code", "source"):
        if values.get(key, "") is None:
            values[key] = ""
    if values.get("metadata", {}) is None:
        values["metadata"] = {}
    problem = Problem(**values)
    try:
        problem.validate()
    except ValueError as exc:
        raise ProblemFormatError(f"{where}: {exc}") from None
    return problem


def iter_problems_jsonl(path: str | os.PathLike) -> Iterator[Problem]:
    """Yield the problems of a file in order; raises :class:`ProblemFormatError` at the first bad line."""
    path = Path(path)
    seen: dict[str, int] = {}
    try:
        handle = _open_text(path, "r")
    except OSError as exc:
        raise ProblemFormatError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    with handle:
        line_number = 0
        while True:
            try:
                line = handle.readline()
            except (UnicodeDecodeError, OSError, EOFError) as exc:
                raise ProblemFormatError(f"{path}:{line_number + 1}: unreadable: {exc}") from None
            if not line:
                break
            line_number += 1
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProblemFormatError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            problem = problem_from_dict(record, where=where)
            if problem.task_id in seen:
                raise ProblemFormatError(
                    f"{where}: duplicate task_id {problem.task_id!r} (first at line {seen[problem.task_id]})")
            seen[problem.task_id] = line_number
            yield problem


def read_problems_jsonl(path: str | os.PathLike) -> list[Problem]:
    return list(iter_problems_jsonl(path))


def write_problems_jsonl(path: str | os.PathLike, problems: Iterable[Problem]) -> int:
    """Write ``problems`` (validated) to ``path`` atomically; returns how many were written."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with _open_text(temporary, "w", gz=path.suffix == ".gz") as handle:
            for problem in problems:
                problem.validate()
                handle.write(json.dumps(problem.to_dict(), ensure_ascii=False) + "\n")
                count += 1
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return count
