"""Format reward for reasoning output and extraction of the code to run.

The expected shape of a reasoning answer (the DeepSeek-R1 template, Guo et al. 2025, whose format reward checks
that reasoning sits between ``<think>`` tags; for code, the answer is one fenced block)::

    <think>
    ...reasoning...
    </think>
    ```python
    def add_3(x):
        return x + 3
    ```

:func:`format_reward` is 1.0 exactly for: optional whitespace, one ``<think>...</think>`` (no nested or repeated
tags), optional whitespace, exactly one fenced code block, optional whitespace, nothing else. Anything else is 0.0.

:func:`extract_code` takes the code to execute from a response: with ``mode="fenced"`` the last fenced block
(preferring blocks tagged with the problem's language), with ``mode="raw"`` the whole text (completion-style
models continuing a prompt), and with ``mode="auto"`` the fenced block when there is one, else the text after a
closing ``</think>``, else the whole text. Pure string functions, hand-written (two regular expressions).
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[ \t]*\n(.*?)(?:\n)?```", re.DOTALL)
_STRICT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*```[ \t]*[A-Za-z0-9_+#.-]*[ \t]*\n(?P<code>.*?)```\s*",
                     re.DOTALL)
_LANGUAGE_TAGS = {"python": {"python", "py", "python3"}, "javascript": {"javascript", "js", "node"},
                  "cpp": {"cpp", "c++", "cxx", "cc"}}
EXTRACTION_MODES = ("fenced", "raw", "auto")


def format_reward(text: str) -> float:
    """1.0 if ``text`` is exactly ``<think>...</think>`` then one fenced code block, else 0.0."""
    match = _STRICT.fullmatch(text)
    if match is None:
        return 0.0
    think = match.group("think")
    if THINK_OPEN in think or THINK_CLOSE in think or "```" in think:
        return 0.0
    if "```" in match.group("code"):
        return 0.0
    return 1.0


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language tag, code)`` for every fenced block, in order (tag lower-cased, may be empty)."""
    return [(tag.lower(), code) for tag, code in _FENCE.findall(text)]


def extract_code(text: str, *, language: str | None = None, mode: str = "auto") -> str | None:
    """The code to run from a model response, or None when ``mode="fenced"`` finds no block."""
    if mode not in EXTRACTION_MODES:
        raise ValueError(f"code extraction mode must be one of {EXTRACTION_MODES}, got {mode!r}")
    if mode == "raw":
        return text
    blocks = fenced_blocks(text)
    if blocks:
        tags = _LANGUAGE_TAGS.get(language or "", set())
        tagged = [code for tag, code in blocks if tag in tags]
        code = (tagged or [code for _, code in blocks])[-1]
        return code if code.endswith("\n") else code + "\n"
    if mode == "fenced":
        return None
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].lstrip("\n")
    return text
