"""Stop strings on detokenised text: spanning tokens, ending inside a token, earliest match, tail window."""

from __future__ import annotations

from betterai_megatron.inference.stopping import StopStringMatcher, find_earliest_stop

# A vocabulary of multi-character pieces, like a BPE tokenizer's.
PIECES = ["<eod>", "def", " foo", "():", "\n", "\n\n", "\n\ndef", "    return", " 1", "#", " end", "x" * 7]


def detokenize(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def run(matcher: StopStringMatcher, ids: list[int]):
    """Feed tokens one at a time as the engine does; return (tokens consumed, hit)."""
    for n in range(1, len(ids) + 1):
        hit = matcher.check(ids[:n])
        if hit is not None:
            return n, hit
    return len(ids), None


def test_find_earliest_stop_prefers_first_offset_then_longer_string():
    assert find_earliest_stop("abc\n\ndef", ["def", "\n\n"]) == (3, "\n\n")
    assert find_earliest_stop("abcdef", ["cd", "cde"]) == (2, "cde")
    assert find_earliest_stop("abc", ["x"]) is None


def test_stop_string_spanning_tokens_is_found_when_completed():
    ids = [1, 2, 3, 4, 7, 8, 4, 4, 1]  # "def foo():\n    return 1\n\ndef"
    consumed, hit = run(StopStringMatcher(["1\n\n"], detokenize), ids)
    assert consumed == 8  # completed by the second of the two "\n" tokens
    assert hit == ("def foo():\n    return ", "1\n\n")


def test_stop_string_ending_inside_a_token_cuts_text_before_it():
    ids = [1, 2, 3, 4, 7, 8, 6, 2]  # ... " 1" then "\n\ndef"
    consumed, hit = run(StopStringMatcher(["\n\n"], detokenize), ids)
    assert consumed == 7
    assert hit == ("def foo():\n    return 1", "\n\n")


def test_no_stop_string_no_hit():
    consumed, hit = run(StopStringMatcher(["return 2"], detokenize), [1, 2, 3, 4, 7, 8, 4])
    assert hit is None and consumed == 7


def test_stop_far_beyond_the_window_start_is_found():
    ids = [11] * 50 + [9, 10]  # 350 characters, then "# end"
    matcher = StopStringMatcher(["# end"], detokenize)
    assert matcher.window_tokens < len(ids)
    consumed, hit = run(matcher, ids)
    assert consumed == 52
    assert hit == ("x" * 350, "# end")


def test_empty_stop_list_never_decodes():
    calls = []
    matcher = StopStringMatcher([], lambda ids: calls.append(ids) or "")
    assert matcher.check([1, 2]) is None and calls == []
