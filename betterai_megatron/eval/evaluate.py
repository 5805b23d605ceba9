"""The evaluation stage: perplexity on held-out indexed data and pass@k of generated code, for one checkpoint.

``betterai eval --config FILE checkpoint.load_dir=DIR [eval.dataset=humaneval ...]``:

* perplexity: the mean per-token loss over ``eval.perplexity_samples`` samples of the validation split of
  ``data.prefixes`` (skipped with ``data.mock`` or no prefixes), reduced over data-parallel ranks;
* pass@k: for every problem (``eval.dataset``: humaneval, leetcode or generated, or ``eval.problems_path``, a
  jsonl in the project's problem format), ``eval.num_samples`` completions are sampled with the generation
  engine in the chat format RL trains on, the code is extracted and run against the tests in the sandbox, and the
  unbiased pass@k estimator (Chen et al. 2021) is averaged over problems.

Prompts that do not fit the model's context (``train.seq_length``) with ``eval.max_new_tokens`` are not
generated for and count as unsolved (``problems_too_long``).

Results go to ``<run.dir>/results.json``, TensorBoard (``<run.dir>/tensorboard``, tags ``eval/<section>/<key>``
at step 0, also appended to ``metrics.jsonl``) and a printed table; per-sample verdicts to ``samples.jsonl``::

    {"checkpoint": DIR,
     "perplexity": {"loss": mean per-token loss, "perplexity": exp(loss), "tokens": N},
     "code": {"pass@1": ..., "pass@k": ..., "format_rate": ..., "problems": P, "problems_too_long": T,
              "samples_per_problem": n}}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """``eval.*``"""

    dataset: Optional[str] = None  # humaneval | leetcode | generated
    problems_path: Optional[str] = None  # a problems .jsonl (used when dataset is null)
    max_problems: Optional[int] = None
    num_samples: int = 4  # completions per problem (n in pass@k)
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.8
    max_new_tokens: int = 256
    perplexity_samples: int = 64

    def validate(self) -> None:
        if self.dataset not in (None, "humaneval", "leetcode", "generated"):
            raise ValueError(f"eval.dataset={self.dataset!r}: choose humaneval, leetcode or generated")
        if any(k < 1 or k > self.num_samples for k in self.k):
            raise ValueError(f"eval.k={self.k}: every k must be in 1..eval.num_samples={self.num_samples}")


def load_eval_problems(config: EvalConfig) -> list:
    from betterai_megatron.data.problems import humaneval, leetcode
    from betterai_megatron.data.problems.generator import generate_problems
    from betterai_megatron.data.problems.jsonl_io import read_problems_jsonl

    if config.dataset == "humaneval":
        problems = humaneval.load_humaneval()
    elif config.dataset == "leetcode":
        problems = leetcode.load_leetcode()
    elif config.dataset == "generated":
        problems = generate_problems(None, seed=1)
    elif config.problems_path:
        problems = read_problems_jsonl(config.problems_path)
    else:
        return []
    return problems[: config.max_problems] if config.max_problems else problems


@torch.no_grad()
def perplexity(model, dataset, *, samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> dict:
    """Mean per-token loss and perplexity over the first ``samples`` samples, split over data-parallel ranks."""
    from betterai_megatron.training.batches import collate

    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)
    indices = list(range(dp_rank, min(samples, len(dataset)), dp_size))
    for start in range(0, len(indices), micro_batch_size):
        batch = collate([dataset[i] for i in indices[start : start + micro_batch_size]])
        losses = model(batch["tokens"].to(device), batch["position_ids"].to(device), None,
                       labels=batch["labels"].to(device))
        mask = batch["loss_mask"].to(losses.device)
        total += torch.stack([(losses.float() * mask).sum().double().cpu(), mask.sum().double().cpu()])
    from megatron.core import parallel_state

    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    loss = float(total[0] / total[1].clamp_min(1))
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "tokens": int(total[1])}


def chat_prompt_ids(template, problem) -> list[int]:
    """The generation prompt of ``problem``: the user turn RL trains on, rendered up to the assistant's turn."""
    from betterai_megatron.pipeline.demo_data import user_message

    return list(template.render_generation_prompt([{"role": "user", "content": user_message(problem)}]))


def split_by_context(problems: list, tokenizer, *, max_positions: int, max_new_tokens: int) -> tuple[list, list]:
    """(problems whose chat prompt plus ``max_new_tokens`` fits ``max_positions``, the others); 0 = no limit."""
    from betterai_megatron.data.chat_template import ChatTemplate

    template = ChatTemplate(tokenizer, reasoning=True)
    fitting, too_long = [], []
    for problem in problems:
        fits = not max_positions or len(chat_prompt_ids(template, problem)) + max_new_tokens <= max_positions
        (fitting if fits else too_long).append(problem)
    return fitting, too_long


def generate_completions(model, tokenizer, problems: list, config: EvalConfig, *, seed: int) -> list:
    """``num_samples`` sampled chat completions per problem (all ranks get all results, problem-major order)."""
    from megatron.core import parallel_state

    from betterai_megatron.data.chat_template import IM_END, ChatTemplate
    from betterai_megatron.inference.config import SamplingParams
    from betterai_megatron.inference.data_parallel import generate_data_parallel
    from betterai_megatron.inference.engine import GenerationEngine

    template = ChatTemplate(tokenizer, reasoning=True)
    prompts = []
    for problem in problems:
        prompts += [chat_prompt_ids(template, problem)] * config.num_samples
    sampling = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              stop_strings=[IM_END], seed=seed)
    engine = GenerationEngine(model, tokenizer=tokenizer)
    return generate_data_parallel(engine, prompts, sampling, dp_group=parallel_state.get_data_parallel_group())


def score_completions(problems: list, completions: list, *, num_samples: int, ks: list[int], root_config) -> dict:
    """Run every completion's code in the sandbox; pass@k per k, per-problem ``(n, correct)`` counts, and
    per-sample records."""
    from betterai_megatron.eval.pass_at_k import mean_pass_at_k
    from betterai_megatron.rewards.executor import CodeExecutor
    from betterai_megatron.rewards.rollout_scoring import RolloutScorer

    repeated = [problem for problem in problems for _ in range(num_samples)]
    texts = [c.text for c in completions]
    with CodeExecutor(root_config.sandbox) as executor:
        scored = RolloutScorer(root_config.rewards, executor).score(repeated, texts, [len(c.tokens) for c in completions])
    counts, records = [], []
    for index, problem in enumerate(problems):
        group = scored[index * num_samples : (index + 1) * num_samples]
        counts.append((num_samples, sum(1 for s in group if s.verdict.passed)))
    for problem, text, s in zip(repeated, texts, scored):
        records.append({"task_id": problem.task_id, "completion": text, "passed": s.verdict.passed,
                        "result": s.verdict.status, "format_reward": s.format_reward})
    result = mean_pass_at_k(counts, ks)
    result["format_rate"] = sum(1 for s in scored if s.format_reward > 0) / max(len(scored), 1)
    result["problems"] = len(problems)
    return {"metrics": result, "records": records, "counts": counts}


def evaluate_code(model, tokenizer, problems: list, config, *, rank: int) -> tuple[dict, list[dict]] | None:
    """pass@k over ``problems`` (on rank 0: (metrics, per-sample records); None elsewhere).

    Problems whose prompt plus ``eval.max_new_tokens`` does not fit the model's context are not generated for
    and count as unsolved (``problems_too_long``), so pass@k stays a mean over every requested problem.
    """
    from betterai_megatron.eval.pass_at_k import mean_pass_at_k

    ev: EvalConfig = config.eval
    fitting, too_long = split_by_context(problems, tokenizer, max_new_tokens=ev.max_new_tokens,
                                         max_positions=int(getattr(model, "max_sequence_length", 0) or 0))
    if too_long and rank == 0:
        logger.warning("%d of %d problems do not fit train.seq_length=%d with eval.max_new_tokens=%d; counted as "
                       "unsolved: %s", len(too_long), len(problems), config.train.seq_length, ev.max_new_tokens,
                       [p.task_id for p in too_long[:10]])
    completions = generate_completions(model, tokenizer, fitting, ev, seed=config.train.seed) if fitting else []
    if rank != 0:
        return None
    scored = {"counts": [], "records": [], "metrics": {"format_rate": 0.0}}
    if fitting:
        scored = score_completions(fitting, completions, num_samples=ev.num_samples, ks=ev.k, root_config=config)
    counts = scored["counts"] + [(ev.num_samples, 0)] * len(too_long)
    metrics = {**mean_pass_at_k(counts, ev.k), "format_rate": scored["metrics"]["format_rate"],
               "problems": len(problems), "problems_too_long": len(too_long), "samples_per_problem": ev.num_samples}
    return metrics, scored["records"]


def run_eval(config) -> dict:
    """The ``eval`` stage on ``checkpoint.load_dir`` (see the module docstring); returns the results."""
    from megatron.core import parallel_state

    from betterai_megatron.config import ConfigError
    from betterai_megatron.data.tokenizer import build_tokenizer
    from betterai_megatron.inference.model_loading import load_model_for_inference

    ev: EvalConfig = config.eval
    if config.data.tokenizer_model is None:
        raise ConfigError("data.tokenizer_model is not set (the tokenizer the model was trained with)")
    if config.checkpoint.load_dir is None:
        raise ConfigError("checkpoint.load_dir is not set: the checkpoint directory to evaluate")
    tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
    problems = load_eval_problems(ev)
    model = load_model_for_inference(config, config.checkpoint.load_dir)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    rank = dist.get_rank()
    results: dict = {"checkpoint": config.checkpoint.load_dir}
    if not config.data.mock and config.data.prefixes:
        from betterai_megatron.data.pretrain_datasets import build_pretrain_datasets

        _, valid, _ = build_pretrain_datasets(data_config=config.data, tokenizer=tokenizer,
                                              seq_length=config.train.seq_length, seed=config.train.seed,
                                              train_samples=1, valid_samples=ev.perplexity_samples, test_samples=0)
        if valid is not None:
            results["perplexity"] = perplexity(model, valid, samples=ev.perplexity_samples,
                                               micro_batch_size=config.train.micro_batch_size,
                                               dp_rank=dp_rank, dp_size=dp_size)
        elif rank == 0:
            logger.warning("data.split=%s has no validation part: no perplexity", config.data.split)
    if problems:
        code = evaluate_code(model, tokenizer, problems, config, rank=rank)
        if code is not None:
            results["code"], records = code
            _write_jsonl(Path(config.run.dir) / "samples.jsonl", records)
    if rank == 0:
        write_results(results, run_dir=Path(config.run.dir), tensorboard=config.log.tensorboard)
        print_results(results)
    dist.barrier()
    return results


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def write_results(results: dict, *, run_dir: Path, tensorboard: bool) -> None:
    """``results.json``, and every number as ``eval/<section>/<key>`` at step 0 in metrics.jsonl / TensorBoard."""
    from betterai_megatron.training.metrics import MetricsWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    writer = MetricsWriter(run_dir, enabled=True, tensorboard=tensorboard, total_steps=0)
    flat = {"step": 0}
    for section in ("perplexity", "code"):
        for key, value in (results.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"eval/{section}/{key}"] = value
    writer.log(flat)
    writer.close()


def print_results(results: dict) -> None:
    print("\n evaluation                | value")
    print("---------------------------+-----------")
    for section in ("perplexity", "code"):
        for key, value in (results.get(section) or {}).items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f" {section + '.' + key:<25} | {shown}")
