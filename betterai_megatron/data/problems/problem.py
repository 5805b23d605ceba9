"""The project's problem format (:class:`Problem`): a verifiable coding task for RL rewards and evaluation.

One problem is one JSON object per line in a problems file (see :mod:`.jsonl_io`)::

    {"task_id": "gen/L1/add_const/3", "prompt": "def add_3(x):\\n    \\"\\"\\"Return x plus 3.\\"\\"\\"\\n",
     "tests": "def check(candidate):\\n    assert candidate(1) == 4\\n", "entry_point": "add_3",
     "language": "python", "difficulty": "easy", "level": 1,
     "canonical_solution": "    return x + 3\\n", "test_cases": ["assert candidate(1) == 4"]}

Fields:

``task_id``             unique name.
``prompt``              what the model sees; HumanEval convention: the program is ``prompt + completion``.
``tests``               test code in the problem's language. Python: defines ``check(candidate)``, called with the
                        entry point (HumanEval). With ``test_cases`` it is also the prelude the cases run after.
``entry_point``         the function (or class) under test.
``language``            ``python``, ``javascript`` or ``cpp``.
``difficulty``          label: ``easy``, ``medium``, ``hard`` or ``unknown``.
``level``               numeric difficulty 1 (easiest) .. 5 (hardest); 0 when unknown.
``canonical_solution``  optional reference completion (``prompt + canonical_solution`` passes the tests).
``test_cases``          optional independent test snippets (each one test, ``candidate`` bound to the entry point),
                        so a reward can be the fraction of cases passed.
``setup_code``          optional trusted definitions run before the program (e.g. ``ListNode``); not shown to the model.
``source``              where it came from (``humaneval``, ``leetcode``, ``generated``, a file name).
``metadata``            free-form extras (title, topics, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

DIFFICULTY_LABELS = ("easy", "medium", "hard", "unknown")
MAX_LEVEL = 5
LANGUAGES = ("python", "javascript", "cpp")


@dataclass
class Problem:
    task_id: str
    prompt: str
    tests: str
    entry_point: str
    language: str = "python"
    difficulty: str = "unknown"
    level: int = 0
    canonical_solution: str | None = None
    test_cases: list[str] | None = None
    setup_code: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a value that breaks the format."""
        for name in ("task_id", "prompt", "tests", "entry_point", "language", "difficulty", "setup_code", "source"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("task_id", "entry_point"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        if self.language not in LANGUAGES:
            raise ValueError(f"language must be one of {list(LANGUAGES)}, got {self.language!r}")
        if self.difficulty not in DIFFICULTY_LABELS:
            raise ValueError(f"difficulty must be one of {list(DIFFICULTY_LABELS)}, got {self.difficulty!r}")
        if not isinstance(self.level, int) or isinstance(self.level, bool) or not 0 <= self.level <= MAX_LEVEL:
            raise ValueError(f"level must be an integer in [0, {MAX_LEVEL}] (0 = unknown), got {self.level!r}")
        if self.canonical_solution is not None and not isinstance(self.canonical_solution, str):
            raise ValueError("canonical_solution must be a string or null")
        if self.test_cases is not None:
            if not isinstance(self.test_cases, list) or not all(isinstance(c, str) for c in self.test_cases):
                raise ValueError("test_cases must be a list of strings or null")
            if not self.test_cases:
                raise ValueError("test_cases must not be an empty list (use null for none)")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata must be an object, got {type(self.metadata).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROBLEM_FIELDS = tuple(f.name for f in fields(Problem))
REQUIRED_FIELDS = ("task_id", "prompt", "tests", "entry_point")


def level_to_label(level: int) -> str:
    """The difficulty label of a numeric level: 1-2 easy, 3 medium, 4-5 hard, 0 unknown."""
    if level <= 0:
        return "unknown"
    return "easy" if level <= 2 else "medium" if level == 3 else "hard"


def label_to_level(label: str) -> int:
    """The numeric level a label maps to when no finer level is known: easy 2, medium 3, hard 4."""
    return {"easy": 2, "medium": 3, "hard": 4}.get(label.lower(), 0)
