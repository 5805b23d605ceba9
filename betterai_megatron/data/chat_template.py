"""The chat template: conversations -> token ids with a per-token assistant mask; the reasoning answer format.

Owns the one text format that SFT trains on and that generation, GRPO and evaluation prompt with (ChatML, the
format of OpenAI's ChatML and Qwen)::

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>

Turns are joined by one newline; there is none after the last turn, so a generation prompt
(``... <|im_start|>assistant\\n``) is a token-exact prefix of the rendered conversation that completes it.

Rendering is done **piece by piece in token space** (each header, content and marker is tokenized on its own and
the ids are concatenated) rather than by tokenizing one rendered string, because:

* the markers are always their single special ids, whatever the tokenizer does with the text around them;
* the assistant mask is exact, with no character-offset mapping (sentencepiece has none for merged pieces);
* what RL trains on is exactly what generation was prompted with (the prompt is a prefix in ids, not in text).

Loss positions (``assistant_mask == 1``): the content tokens of every assistant turn and the ``<|im_end|>`` that
closes it, so the model learns to stop; headers, system and user turns, and the newlines between turns are not
trained (the same choice as Qwen/OpenRLHF chat SFT).

The reasoning variant (GRPO issue): the assistant answers ``<think>{reasoning}</think>`` followed by exactly one
fenced code block. :func:`format_reasoning_response` writes that answer, :func:`parse_reasoning_response` checks
it (for the format reward) and extracts the code (for the test reward). Inside any content the tags ``<think>`` and
``</think>`` are always encoded as their special ids.

Tokenizer interface (duck-typed, see ``betterai_megatron.data.tokenizer``): ``tokenize(text) -> list[int]``,
``detokenize(ids) -> str``, ``special_token_id(name) -> int``.

Hand-written: HF ``apply_chat_template`` (jinja) renders strings, gives no token mask for sentencepiece models
and would add ``transformers`` as a dependency; the template is 20 lines of logic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
ROLES = ("system", "user", "assistant")

REASONING_SYSTEM_PROMPT = (
    "You are an expert programmer. First think through the problem step by step between <think> and </think>. "
    "Then give your final answer as exactly one fenced code block, and nothing after it."
)

_RESERVED_IN_CONTENT = (IM_START, IM_END)
_THINK_SPLIT = re.compile(f"({re.escape(THINK_START)}|{re.escape(THINK_END)})")
# A fenced block: ```lang\n ... ``` (lang optional). Non-greedy body; the closing fence must start a line.
_FENCE = re.compile(r"```([A-Za-z0-9_+#.\-]*)[ \t]*\n(.*?)(?:^|\n)```", re.DOTALL | re.MULTILINE)


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message names the turn and the problem."""


@dataclass(frozen=True)
class RenderedConversation:
    """Token ids ``[n]`` and the aligned loss mask ``[n]`` (1 where the token is an assistant target)."""

    token_ids: list[int]
    assistant_mask: list[int]

    def __len__(self) -> int:
        return len(self.token_ids)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation and return it as plain ``[{"role", "content"}]`` dicts.

    Rules: a non-empty list; each turn a mapping with ``role`` in :data:`ROLES` and string ``content``; ``system``
    only as the first turn; no turn contains the reserved markers ``<|im_start|>``/``<|im_end|>`` (they would
    forge turn boundaries). Raises :class:`ConversationError` naming the turn index.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError(f"a conversation must be a non-empty list of turns, got {type(messages).__name__}")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise ConversationError(f"turn {i}: expected a mapping with 'role' and 'content', got {turn!r:.80}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ConversationError(f"turn {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ConversationError(f"turn {i} ({role}): content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ConversationError(f"turn {i}: a system turn may only come first")
        for marker in _RESERVED_IN_CONTENT:
            if marker in content:
                raise ConversationError(f"turn {i} ({role}): content contains the reserved marker {marker!r}")
        turns.append({"role": role, "content": content})
    return turns


class ChatTemplate:
    """ChatML rendering in token space for one tokenizer.

    Args:
        tokenizer: the project tokenizer (``tokenize``, ``special_token_id``).
        system_prompt: inserted as the system turn when a conversation has none (``None``: no system turn).
        reasoning: use :data:`REASONING_SYSTEM_PROMPT` as the default system prompt (when ``system_prompt`` is
            None) and require the tokenizer to have the ``<think>``/``</think>`` tokens.
    """

    def __init__(self, tokenizer: Any, *, system_prompt: str | None = None, reasoning: bool = False) -> None:
        self.tokenizer = tokenizer
        self.reasoning = reasoning
        self.system_prompt = system_prompt if system_prompt is not None else (
            REASONING_SYSTEM_PROMPT if reasoning else None)
        self.im_start_id = _special_id(tokenizer, IM_START)
        self.im_end_id = _special_id(tokenizer, IM_END)
        self.think_start_id = _special_id(tokenizer, THINK_START, required=reasoning)
        self.think_end_id = _special_id(tokenizer, THINK_END, required=reasoning)
        self._separator = list(tokenizer.tokenize("\n"))
        self._headers = {role: [self.im_start_id, *tokenizer.tokenize(f"{role}\n")] for role in ROLES}

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at the end of the assistant turn."""
        return [self.im_end_id]

    def _with_default_system(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and turns[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *turns]
        return turns

    def encode_content(self, text: str) -> list[int]:
        """Tokenize turn content, mapping ``<think>``/``</think>`` to their special ids when the tokenizer has them."""
        if self.think_start_id is None or self.think_end_id is None:
            return list(self.tokenizer.tokenize(text)) if text else []
        ids: list[int] = []
        for piece in _THINK_SPLIT.split(text):
            if piece == THINK_START:
                ids.append(self.think_start_id)
            elif piece == THINK_END:
                ids.append(self.think_end_id)
            elif piece:
                ids.extend(self.tokenizer.tokenize(piece))
        return ids

    def render(self, messages: Sequence[Mapping[str, str]]) -> RenderedConversation:
        """Render a whole conversation: ids ``[n]`` and assistant mask ``[n]``."""
        turns = self._with_default_system(validate_messages(messages))
        ids: list[int] = []
        mask: list[int] = []
        for i, turn in enumerate(turns):
            if i:
                ids += self._separator
                mask += [0] * len(self._separator)
            header = self._headers[turn["role"]]
            body = self.encode_content(turn["content"]) + [self.im_end_id]
            trained = 1 if turn["role"] == "assistant" else 0
            ids += header + body
            mask += [0] * len(header) + [trained] * len(body)
        return RenderedConversation(token_ids=ids, assistant_mask=mask)

    def render_generation_prompt(self, messages: Sequence[Mapping[str, str]], *, prefill_think: bool = False
                                 ) -> list[int]:
        """Ids of the conversation followed by an open assistant turn (``<|im_start|>assistant\\n``).

        The conversation must not end with an assistant turn. ``prefill_think`` appends ``<think>`` so the model
        starts by reasoning (parse the completion with ``parse_reasoning_response(..., think_prefilled=True)``).
        """
        turns = validate_messages(messages)
        if turns[-1]["role"] == "assistant":
            raise ConversationError("a generation prompt must not end with an assistant turn")
        ids = self.render(turns).token_ids + self._separator + self._headers["assistant"]
        if prefill_think:
            if self.think_start_id is None:
                raise ConversationError(f"prefill_think needs the tokenizer to have {THINK_START!r}")
            ids.append(self.think_start_id)
        return ids

    def render_text(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The same conversation as a string (for logs and trajectories; training uses :meth:`render`)."""
        turns = self._with_default_system(validate_messages(messages))
        text = "\n".join(f"{IM_START}{t['role']}\n{t['content']}{IM_END}" for t in turns)
        return text + (f"\n{IM_START}assistant\n" if add_generation_prompt else "")


def _special_id(tokenizer: Any, name: str, *, required: bool = True) -> int | None:
    try:
        token_id = tokenizer.special_token_id(name)
    except (KeyError, ValueError, LookupError) as exc:
        if required:
            raise ConversationError(f"the tokenizer has no special token {name!r}; train it with the chat "
                                    "special tokens (tools/train_tokenizer.py)") from exc
        return None
    if token_id is None or int(token_id) < 0:
        if required:
            raise ConversationError(f"the tokenizer has no special token {name!r}")
        return None
    return int(token_id)


def conversation_from_prompt_response(prompt: str, response: str | None = None, *, system: str | None = None
                                      ) -> list[dict[str, str]]:
    """``[system?, user, assistant?]`` turns from a prompt and an optional response."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    turns.append({"role": "user", "content": prompt})
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return turns


# ----------------------------------------------------------------------------------------------- reasoning format

def format_reasoning_response(reasoning: str, code: str, *, language: str = "python") -> str:
    """The assistant answer of the reasoning format: ``<think>\\n{reasoning}\\n</think>\\n```lang\\n{code}\\n```\\``."""
    return f"{THINK_START}\n{reasoning.strip()}\n{THINK_END}\n```{language}\n{code.strip(chr(10))}\n```"


@dataclass(frozen=True)
class ParsedReasoningResponse:
    """What :func:`parse_reasoning_response` found.

    ``code`` is extracted leniently (the last fenced block anywhere, so a test reward can still run it);
    ``format_ok`` is strict: exactly one ``<think>...</think>`` at the start, then exactly one fenced block,
    then nothing but whitespace. ``problem`` says why the format failed (``None`` when ``format_ok``).
    """

    reasoning: str | None
    code: str | None
    language: str | None
    format_ok: bool
    problem: str | None


def parse_reasoning_response(text: str, *, think_prefilled: bool = False) -> ParsedReasoningResponse:
    """Parse a completion in the reasoning format (the text after ``<|im_start|>assistant\\n``).

    A trailing ``<|im_end|>`` (if the caller kept the stop token) is ignored. ``think_prefilled``: the prompt
    already ended with ``<think>``, so the completion starts inside the reasoning.
    """
    body = text.rstrip()
    if body.endswith(IM_END):
        body = body[: -len(IM_END)].rstrip()
    if think_prefilled:
        body = THINK_START + body
    fences = list(_FENCE.finditer(body))
    code = fences[-1].group(2) if fences else None
    language = (fences[-1].group(1) or None) if fences else None

    def fail(problem: str, reasoning: str | None = None) -> ParsedReasoningResponse:
        return ParsedReasoningResponse(reasoning, code, language, False, problem)

    stripped = body.lstrip()
    if not stripped.startswith(THINK_START):
        return fail(f"does not start with {THINK_START}")
    if body.count(THINK_START) != 1 or body.count(THINK_END) != 1:
        return fail(f"needs exactly one {THINK_START} and one {THINK_END}")
    reasoning, _, after = stripped[len(THINK_START):].partition(THINK_END)
    reasoning = reasoning.strip()
    after_fences = list(_FENCE.finditer(after))
    if len(after_fences) != 1:
        return fail(f"needs exactly one fenced code block after {THINK_END}, found {len(after_fences)}", reasoning)
    block = after_fences[0]
    if after[: block.start()].strip() or after[block.end():].strip():
        return fail("text outside the code block after the reasoning", reasoning)
    return ParsedReasoningResponse(reasoning, block.group(2), block.group(1) or None, True, None)
