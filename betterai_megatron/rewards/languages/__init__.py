"""Language runners behind one interface (:class:`~.base.LanguageRunner`), chosen by a problem's ``language``.

``RUNNERS`` maps the canonical names (``python``, ``javascript``, ``cpp``) to runner classes; ``normalize_language``
accepts the usual aliases (``py``, ``js``, ``node``, ``c++``, ``cxx``). Which languages a pool accepts is
``sandbox.languages``.
"""

from __future__ import annotations

from betterai_megatron.rewards.languages.base import CodeJob, LanguageRunner
from betterai_megatron.rewards.languages.cpp_runner import CppRunner
from betterai_megatron.rewards.languages.javascript_runner import JavaScriptRunner
from betterai_megatron.rewards.languages.python_runner import PythonRunner

RUNNERS: dict[str, type[LanguageRunner]] = {"python": PythonRunner, "javascript": JavaScriptRunner, "cpp": CppRunner}
_ALIASES = {"py": "python", "python3": "python", "js": "javascript", "node": "javascript", "nodejs": "javascript",
            "c++": "cpp", "cxx": "cpp"}


def normalize_language(name: str) -> str:
    """The canonical language name for ``name``; ``ValueError`` for an unknown one."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in RUNNERS:
        raise ValueError(f"unknown language {name!r}; supported: {sorted(RUNNERS)} (aliases: {sorted(_ALIASES)})")
    return key


__all__ = [
    "RUNNERS",
    "CodeJob",
    "CppRunner",
    "JavaScriptRunner",
    "LanguageRunner",
    "PythonRunner",
    "normalize_language",
]
