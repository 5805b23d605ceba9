"""Stop strings, checked on the detokenised text of a row's generated tokens.

A stop string can span several tokens, or end inside one token ("\\n\\ndef" completes the stop "\\n\\n"), so it is
looked for in text, never in token ids. Detokenising the whole generation at every step costs O(n^2) over a
generation; instead :class:`StopStringMatcher` decodes only a tail window of the newest tokens at each step, and
confirms a hit on the full text (decoding a token suffix can differ from the suffix of the full decode at the
window's first token, e.g. sentencepiece's leading-space rule, so the tail is only a filter).

The window: a stop string of ``L`` characters that ends in the newest token starts within the last ``L``
characters, which come from at most ``L`` tokens (a token decodes to >= 1 character), or ``4 L`` byte-fallback
tokens for 4-byte UTF-8 characters; two tokens of margin cover the leading-space rule at the window start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def find_earliest_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """``(character offset, stop string)`` of the stop string occurring first in ``text``, or None.

    Ties at the same offset go to the longer stop string (it is the more specific match).
    """
    best: tuple[int, str] | None = None
    for stop in stop_strings:
        offset = text.find(stop)
        if offset < 0:
            continue
        if best is None or offset < best[0] or (offset == best[0] and len(stop) > len(best[1])):
            best = (offset, stop)
    return best


class StopStringMatcher:
    """Per-step stop-string check for one row; ``detokenize`` maps token ids to text."""

    def __init__(self, stop_strings: Sequence[str], detokenize: Callable[[list[int]], str]):
        self.stop_strings = list(stop_strings)
        self._detokenize = detokenize
        longest = max((len(s) for s in self.stop_strings), default=0)
        self.window_tokens = 4 * longest + 2

    def check(self, tokens: list[int]) -> tuple[str, str] | None:
        """After a new token was appended to ``tokens`` (generated tokens only): ``(text before the stop, stop)``
        if the generation now contains a stop string, else None."""
        if not self.stop_strings:
            return None
        tail = self._detokenize(tokens[-self.window_tokens :])
        if find_earliest_stop(tail, self.stop_strings) is None:
            return None
        text = self._detokenize(tokens)
        hit = find_earliest_stop(text, self.stop_strings)
        if hit is None:
            return None
        offset, stop = hit
        return text[:offset], stop
