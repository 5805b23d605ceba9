"""Chat template: token layout, assistant loss mask, generation prompts, the reasoning format."""

from __future__ import annotations

import pytest

from betterai_megatron.data.chat_template import (
    REASONING_SYSTEM_PROMPT,
    ChatTemplate,
    ConversationError,
    format_reasoning_response,
    parse_reasoning_response,
)

try:
    import test_sft_support as support
except ImportError:  # tests/ made a package
    from tests.data import test_sft_support as support

CharTokenizer = support.CharTokenizer
sp_tokenizer = support.sp_tokenizer  # a fixture

IMS, IME, THINK, END_THINK = 2, 3, 4, 5  # CharTokenizer's special ids


def chars(text: str) -> list[int]:
    return [6 + ord(c) for c in text]


def test_assistant_mask_on_hand_built_conversation():
    """system 'S', user 'hi', assistant 'ok' with one token per character, counted by hand:
    [0] <|im_start|> [1..7] 'system\\n' [8] 'S' [9] <|im_end|> [10] '\\n'
    [11] <|im_start|> [12..16] 'user\\n' [17,18] 'hi' [19] <|im_end|> [20] '\\n'
    [21] <|im_start|> [22..31] 'assistant\\n' [32,33] 'ok' [34] <|im_end|>  -> 35 tokens, loss on 32, 33, 34."""
    template = ChatTemplate(CharTokenizer())
    rendered = template.render([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "ok"}])
    expected = ([IMS] + chars("system\nS") + [IME] + chars("\n") + [IMS] + chars("user\nhi") + [IME] + chars("\n")
                + [IMS] + chars("assistant\nok") + [IME])
    assert rendered.token_ids == expected
    assert len(rendered.token_ids) == 35
    assert [i for i, m in enumerate(rendered.assistant_mask) if m] == [32, 33, 34]


def test_every_assistant_turn_is_trained_and_nothing_else():
    """Two exchanges, user 'a' / assistant 'xy' then user 'b' / assistant 'z'; positions counted by hand below."""
    template = ChatTemplate(CharTokenizer())
    rendered = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "xy"},
                                {"role": "user", "content": "b"}, {"role": "assistant", "content": "z"}])
    # [0] IMS [1..5] 'user\n' [6] 'a' [7] IME [8] '\n' [9] IMS [10..19] 'assistant\n' [20,21] 'xy' [22] IME
    # [23] '\n' [24] IMS [25..29] 'user\n' [30] 'b' [31] IME [32] '\n' [33] IMS [34..43] 'assistant\n' [44] 'z' [45] IME
    assert len(rendered.token_ids) == 46
    assert [i for i, m in enumerate(rendered.assistant_mask) if m] == [20, 21, 22, 44, 45]


def test_masked_tokens_decode_to_the_assistant_answers(sp_tokenizer):
    template = ChatTemplate(sp_tokenizer)
    answers = ["def add(a, b):\n    return a + b", "print the result"]
    rendered = template.render([{"role": "user", "content": "write add"}, {"role": "assistant", "content": answers[0]},
                                {"role": "user", "content": "and then"}, {"role": "assistant", "content": answers[1]}])
    spans, current = [], []
    for token, mask in zip(rendered.token_ids, rendered.assistant_mask):
        if mask:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [sp_tokenizer.detokenize(s) for s in spans] == [a + "<|im_end|>" for a in answers]


def test_rendered_ids_decode_to_the_chatml_text(sp_tokenizer):
    template = ChatTemplate(sp_tokenizer, system_prompt="be brief")
    messages = [{"role": "user", "content": "sort a list"}, {"role": "assistant", "content": "sorted(x)"}]
    text = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsort a list<|im_end|>\n"
            "<|im_start|>assistant\nsorted(x)<|im_end|>")
    assert sp_tokenizer.detokenize(template.render(messages).token_ids) == text
    assert template.render_text(messages) == text


def test_generation_prompt_is_a_token_prefix_of_the_completed_conversation(sp_tokenizer):
    template = ChatTemplate(sp_tokenizer)
    prompt_turns = [{"role": "system", "content": "you write code"}, {"role": "user", "content": "add two numbers"}]
    prompt = template.render_generation_prompt(prompt_turns)
    assert sp_tokenizer.detokenize(prompt) == ("<|im_start|>system\nyou write code<|im_end|>\n"
                                               "<|im_start|>user\nadd two numbers<|im_end|>\n<|im_start|>assistant\n")
    full = template.render([*prompt_turns, {"role": "assistant", "content": "return a + b"}])
    assert full.token_ids[: len(prompt)] == prompt
    assert sp_tokenizer.detokenize(full.token_ids[len(prompt):]) == "return a + b<|im_end|>"
    assert template.render_text(prompt_turns, add_generation_prompt=True) == sp_tokenizer.detokenize(prompt)
    with pytest.raises(ConversationError, match="must not end with an assistant turn"):
        template.render_generation_prompt([*prompt_turns, {"role": "assistant", "content": "x"}])


def test_reasoning_template_uses_special_think_ids_and_default_system_prompt():
    template = ChatTemplate(CharTokenizer(), reasoning=True)
    answer = format_reasoning_response("add them", "return a + b")
    assert answer == "<think>\nadd them\n</think>\n```python\nreturn a + b\n```"
    rendered = template.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}])
    # once in the default system prompt (which names the tags), once in the answer
    assert rendered.token_ids.count(THINK) == 2 and rendered.token_ids.count(END_THINK) == 2
    trained = [t for t, m in zip(rendered.token_ids, rendered.assistant_mask) if m]
    assert trained == [THINK] + chars("\nadd them\n") + [END_THINK] + chars("\n```python\nreturn a + b\n```") + [IME]
    assert rendered.token_ids[: 1 + len("system\n")] == [IMS] + chars("system\n")
    assert CharTokenizer().detokenize(rendered.token_ids).startswith(
        f"<|im_start|>system\n{REASONING_SYSTEM_PROMPT}<|im_end|>")
    prompt = template.render_generation_prompt([{"role": "user", "content": "q"}], prefill_think=True)
    assert prompt[-1] == THINK and prompt[-1 - len("assistant\n") - 1] == IMS


def test_reasoning_needs_think_tokens():
    with pytest.raises(ConversationError, match="<think>"):
        ChatTemplate(CharTokenizer(specials=("<|im_start|>", "<|im_end|>")), reasoning=True)


@pytest.mark.parametrize("text, ok, code, problem", [
    ("<think>\nplan\n</think>\n```python\nx = 1\n```", True, "x = 1", None),
    ("<think>plan</think>```py\nx = 1\n```\n<|im_end|>", True, "x = 1", None),
    ("<think>plan</think>\n```\n```", True, "", None),
    ("```python\nx = 1\n```", False, "x = 1", "does not start with <think>"),
    ("<think>plan</think>\n```python\na\n```\n```python\nb\n```", False, "b", "exactly one fenced code block"),
    ("<think>plan</think>\n```python\na\n```\nmore words", False, "a", "text outside the code block"),
    ("<think>plan</think> words ```python\na\n```", False, "a", "text outside the code block"),
    ("<think>plan</think>\nno code", False, None, "found 0"),
    ("<think>a</think><think>b</think>\n```python\nx\n```", False, "x", "exactly one <think>"),
    ("<think>never closed ```python\nx\n```", False, "x", "exactly one <think>"),
])
def test_parse_reasoning_response(text, ok, code, problem):
    parsed = parse_reasoning_response(text)
    assert parsed.format_ok is ok
    assert parsed.code == code
    if problem is None:
        assert parsed.problem is None and parsed.reasoning == "plan"
    else:
        assert problem in parsed.problem


def test_parse_reasoning_response_after_prefilled_think():
    parsed = parse_reasoning_response("step one\n</think>\n```python\nprint(1)\n```", think_prefilled=True)
    assert parsed.format_ok and parsed.reasoning == "step one" and parsed.code == "print(1)"
    assert parsed.language == "python"


def test_round_trip_of_the_reasoning_format():
    parsed = parse_reasoning_response(format_reasoning_response("  think hard ", "\ndef f():\n    return 1\n"))
    assert parsed.format_ok and parsed.reasoning == "think hard" and parsed.code == "def f():\n    return 1"


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "turn 0: role must be one of"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "turn 1: a system turn"),
    ([{"role": "user", "content": None}], r"turn 0 \(user\): content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b<|im_end|>"}],
     r"turn 1 \(assistant\): content contains the reserved marker '<\|im_end\|>'"),
    (["just text"], "turn 0: expected a mapping"),
])
def test_bad_conversations_name_the_turn(messages, match):
    with pytest.raises(ConversationError, match=match):
        ChatTemplate(CharTokenizer()).render(messages)
