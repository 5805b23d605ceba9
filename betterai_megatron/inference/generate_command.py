"""``betterai generate --config FILE --checkpoint DIR --prompts prompts.jsonl --output out.jsonl [key=value ...]``.

Samples a completion for every prompt of a JSONL file with a trained checkpoint, across all ranks of the launch
(tensor parallel within a replica, data parallel across replicas; see ``engine.py`` for the supported layouts).

Input, one JSON object per line (blank lines skipped)::

    {"id": "HumanEval/0", "prompt": "def add(a, b):\\n"}        # text, tokenised with the config's tokenizer
    {"prompt_tokens": [1, 529, 4021]}                            # or token ids; "id" is optional

Output, one line per input line, in input order: ``id`` (when given), ``prompt`` (text, when given), then
``completion`` (text, cut before a stop string), ``tokens``, ``log_probs`` (per token, see
``outputs.GenerationResult``), ``finish_reason`` (eod / stop / length), ``stop_string`` and ``prompt_index``.
Sampling comes from the config's ``generation`` section (dotted overrides such as
``generation.sampling.temperature=0`` work as for every command).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import GenerationConfig
from .outputs import GenerationResult


@dataclass
class PromptRecord:
    """One input line: the prompt's token ids plus what is echoed to the output."""

    line_number: int
    tokens: list[int]
    prompt_id: Any = None
    text: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (model, parallel, data.tokenizer_*, generation)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory to load the weights from")
    parser.add_argument("--prompts", required=True, help="JSONL file: one {\"prompt\": text} or {\"prompt_tokens\": [ids]} per line")
    parser.add_argument("--output", required=True, help="JSONL file to write, one line per prompt, in input order")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generation.sampling.temperature=0")


def read_prompts(path: str | Path, tokenizer) -> list[PromptRecord]:
    """Parse the prompts file; every error names ``file:line``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg}") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
            if ("prompt" in item) == ("prompt_tokens" in item):
                raise ValueError(f"{where}: give exactly one of \"prompt\" (text) or \"prompt_tokens\" (ids)")
            if "prompt" in item:
                if not isinstance(item["prompt"], str):
                    raise ValueError(f"{where}: \"prompt\" must be a string")
                tokens = list(tokenizer.tokenize(item["prompt"]))
                text = item["prompt"]
            else:
                tokens, text = item["prompt_tokens"], None
                if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                    raise ValueError(f"{where}: \"prompt_tokens\" must be a list of integers")
            if not tokens:
                raise ValueError(f"{where}: the prompt is empty (no tokens)")
            records.append(PromptRecord(line_number, tokens, item.get("id"), text))
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def generate_records(model, tokenizer, records: list[PromptRecord], *, config: GenerationConfig, dp_group=None) -> list[GenerationResult]:
    """All records' generations, in order, on every rank (data parallel over ``dp_group``)."""
    from .data_parallel import generate_data_parallel
    from .engine import GenerationEngine

    engine = GenerationEngine(model, tokenizer=tokenizer, config=config)
    return generate_data_parallel(engine, [r.tokens for r in records], config.sampling, dp_group=dp_group)


def write_results(path: str | Path, records: list[PromptRecord], results: list[GenerationResult]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record, result in zip(records, results, strict=True):
            line: dict[str, Any] = {}
            if record.prompt_id is not None:
                line["id"] = record.prompt_id
            if record.text is not None:
                line["prompt"] = record.text
            line.update(result.to_json())
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(path)  # readers never see a half-written file


def main(args: argparse.Namespace) -> int:
    from betterai_megatron.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"betterai generate: {exc}", file=sys.stderr)
        return 2
    generation = getattr(config, "generation", None) or GenerationConfig()
    from betterai_megatron.data.tokenizer import build_tokenizer

    if not config.data.tokenizer_model:
        print("betterai generate: data.tokenizer_model is not set (the tokenizer the model was trained with)",
              file=sys.stderr)
        return 2
    try:
        tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
        records = read_prompts(args.prompts, tokenizer)  # bad input fails before any model is built
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"betterai generate: {exc}", file=sys.stderr)
        return 2
    # Provided by the training side: initialises torch.distributed and the parallel layout from the config,
    # builds the model and loads the checkpoint's weights (no optimizer state).
    import torch.distributed as dist
    from megatron.core import parallel_state

    from betterai_megatron.inference.model_loading import load_model_for_inference

    model = load_model_for_inference(config, args.checkpoint)
    results = generate_records(model, tokenizer, records, config=generation,
                               dp_group=parallel_state.get_data_parallel_group())
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_results(args.output, records, results)
        reasons = {reason: sum(r.finish_reason == reason for r in results) for reason in ("eod", "stop", "length")}
        print(f"betterai generate: {len(results)} completions, {sum(len(r.tokens) for r in results)} tokens "
              f"({reasons}) -> {args.output}")
    if dist.is_initialized():
        dist.barrier()
    return 0
