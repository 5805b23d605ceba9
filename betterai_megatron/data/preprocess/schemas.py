"""Record -> (texts, language): the field mapping for each supported corpus schema.

Owns :func:`extract`, which every worker applies to every record, and :class:`RecordError`, the reason a
record is rejected (reported as ``file:line: reason`` and written to ``{prefix}.rejected.jsonl``).

Schemas (``--schema``):

- ``raw`` (default, Megatron-LM's behaviour): one text per ``--json-keys`` key; a value is a string or a list of
  strings (pre-split sentences, each tokenized separately as Megatron does); language from ``--language-key``.
- ``the-stack``: ``content`` (+ ``lang``, or ``language`` as in The Stack v2), bigcode/the-stack layout.
- ``magicoder``: Magicoder-OSS-Instruct ``problem`` + ``solution`` (+ ``lang``); Evol-Instruct's
  ``instruction`` + ``response`` is accepted too. Text = problem, blank line, solution.
- ``code-feedback``: m-a-p/Code-Feedback ``messages`` = ``[{role, content}, ...]``; text = the contents joined
  by blank lines; language = the first fenced code block's tag.
- ``codeultrafeedback``: coseal/CodeUltraFeedback ``instruction`` + ``responses`` ``[{model, response}]`` +
  ``annotations`` ``[{model, rating, rationale}]`` (ratings are strings); text = instruction, blank line, the
  best-rated response (first on ties); language from the instruction's or response's code fence.

Chat rendering with a template is the SFT dataset's job; here these corpora become plain pretraining text.
"""

from __future__ import annotations

from betterai_megatron.data.languages import language_from_markdown, normalize_language


class RecordError(ValueError):
    """A record that cannot become a document; the message is the reason shown to the user."""


def _string(record: dict, key: str) -> str:
    if key not in record:
        raise RecordError(f"missing key {key!r}")
    value = record[key]
    if value is None:
        raise RecordError(f"key {key!r} is null")
    if not isinstance(value, str):
        raise RecordError(f"key {key!r} is {type(value).__name__}, expected a string")
    return value


def _raw_value(record: dict, key: str) -> str | list[str]:
    if key not in record:
        raise RecordError(f"missing key {key!r}")
    value = record[key]
    if isinstance(value, str):
        return value
    if value is None:
        raise RecordError(f"key {key!r} is null")
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise RecordError(f"key {key!r}: item {index} is {type(item).__name__}, expected a string")
        return value
    raise RecordError(f"key {key!r} is {type(value).__name__}, expected a string or a list of strings")


def _the_stack(record: dict) -> tuple[list, str]:
    text = _string(record, "content")
    label = record.get("lang", record.get("language"))
    return [text], normalize_language(label if isinstance(label, str) else None)


def _magicoder(record: dict) -> tuple[list, str]:
    if "problem" in record or "solution" in record:
        problem, solution = _string(record, "problem"), _string(record, "solution")
    else:
        problem, solution = _string(record, "instruction"), _string(record, "response")
    label = record.get("lang")
    language = normalize_language(label) if isinstance(label, str) else language_from_markdown(solution)
    return [f"{problem}\n\n{solution}"], language


def _code_feedback(record: dict) -> tuple[list, str]:
    if "messages" not in record:
        raise RecordError("missing key 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError("key 'messages' must be a non-empty list of {role, content}")
    contents = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RecordError(f"messages[{index}] has no string 'content'")
        contents.append(message["content"])
    text = "\n\n".join(contents)
    return [text], language_from_markdown(text)


def _rating(annotation: object) -> float:
    rating = annotation.get("rating") if isinstance(annotation, dict) else None
    try:
        return float(rating)
    except (TypeError, ValueError):
        return float("-inf")


def _codeultrafeedback(record: dict) -> tuple[list, str]:
    instruction = _string(record, "instruction")
    responses = record.get("responses")
    if not isinstance(responses, list) or not responses:
        raise RecordError("key 'responses' must be a non-empty list of {model, response}")
    ratings = {}
    for annotation in record.get("annotations") or []:
        if isinstance(annotation, dict):
            ratings.setdefault(annotation.get("model"), _rating(annotation))
    best_index, best_rating = None, float("-inf")
    for index, response in enumerate(responses):
        if not isinstance(response, dict) or not isinstance(response.get("response"), str):
            raise RecordError(f"responses[{index}] has no string 'response'")
        rating = ratings.get(response.get("model"), float("-inf"))
        if best_index is None or rating > best_rating:
            best_index, best_rating = index, rating
    answer = responses[best_index]["response"]
    language = language_from_markdown(answer)
    if language == "unknown":
        language = language_from_markdown(instruction)
    return [f"{instruction}\n\n{answer}"], language


_MAPPERS = {
    "the-stack": _the_stack,
    "magicoder": _magicoder,
    "code-feedback": _code_feedback,
    "codeultrafeedback": _codeultrafeedback,
}


def extract(record: object, *, schema: str, json_keys: tuple[str, ...], language_key: str) -> tuple[list, str]:
    """Texts (one per output key; each a string or a list of strings) and the canonical language of a record.

    Raises :class:`RecordError` with the reason when the record does not fit the schema.
    """
    if not isinstance(record, dict):
        raise RecordError(f"not a JSON object (got {type(record).__name__})")
    if schema == "raw":
        texts = [_raw_value(record, key) for key in json_keys]
        label = record.get(language_key)
        return texts, normalize_language(label if isinstance(label, str) else None)
    return _MAPPERS[schema](record)
