"""``betterai generate`` pieces that do not need a checkpoint: reading prompts (errors name file:line),
generating for records, writing the output in input order."""

from __future__ import annotations

import argparse
import json

import pytest

from betterai_megatron.inference.config import GenerationConfig, SamplingParams
from betterai_megatron.inference.engine import GenerationEngine
from betterai_megatron.inference.generate_command import (
    add_arguments,
    generate_records,
    read_prompts,
    write_results,
)


def test_command_line_is_the_documented_one():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", "c.yaml", "--checkpoint", "ckpt", "--prompts", "p.jsonl", "--output",
                              "o.jsonl", "generation.sampling.temperature=0"])
    assert (args.config, args.checkpoint, args.prompts, args.output) == ("c.yaml", "ckpt", "p.jsonl", "o.jsonl")
    assert args.overrides == ["generation.sampling.temperature=0"]


def test_read_prompts_text_and_token_lines(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "def f"}\n\n{"prompt_tokens": [5, 6]}\n')
    records = read_prompts(path, tokenizer)
    assert [(r.line_number, r.tokens, r.prompt_id, r.text) for r in records] == [
        (1, tokenizer.tokenize("def f"), "a", "def f"), (3, [5, 6], None, None)]


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: invalid JSON"),
    ("[1, 2]", ":2: expected a JSON object"),
    ('{"text": "x"}', ':2: give exactly one of "prompt"'),
    ('{"prompt": "x", "prompt_tokens": [1]}', ':2: give exactly one of "prompt"'),
    ('{"prompt_tokens": [1, "2"]}', ':2: "prompt_tokens" must be a list of integers'),
    ('{"prompt": ""}', ":2: the prompt is empty"),
])
def test_read_prompts_errors_name_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"p.jsonl{message}"):
        read_prompts(path, tokenizer)


def test_generate_and_write_in_input_order(tmp_path, softmax_model, tokenizer):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": text}) + "\n"
                               for i, text in enumerate(["import sys\n", "x", "def g(y):"])))
    config = GenerationConfig(max_batch_size=2, sampling=SamplingParams(temperature=0.8, max_new_tokens=10, seed=4))
    records = read_prompts(prompts, tokenizer)
    output = tmp_path / "out" / "o.jsonl"
    write_results(output, records, generate_records(softmax_model, tokenizer, records, config=config))
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    expected = GenerationEngine(softmax_model, tokenizer=tokenizer).generate([r.tokens for r in records], config.sampling)
    assert [line["id"] for line in lines] == [0, 1, 2]
    assert [line["prompt"] for line in lines] == ["import sys\n", "x", "def g(y):"]
    assert [line["tokens"] for line in lines] == [r.tokens for r in expected]
    assert [line["completion"] for line in lines] == [r.text for r in expected]
    assert all(len(line["log_probs"]) == len(line["tokens"]) for line in lines)
