"""The sampling half of one STaR iteration, a process entry point run under ``torchrun`` (one process per rank):

``python -m torch.distributed.run --nproc-per-node N -m betterai_megatron.rl.star_sample --config FILE
--output-dir DIR --iteration I [overrides]``

loads ``checkpoint.load_dir`` (a fresh model from ``train.seed`` when null), samples ``star.samples_per_problem``
answers per problem with the generation engine (every rank generates its data-parallel share, all ranks get all
answers), scores them in the sandbox on rank 0, optionally samples rationalizations for the unsolved problems
(:func:`betterai_megatron.rl.star.rationalization_message`), and rank 0 writes under ``DIR``:

* ``kept.jsonl`` — the SFT conversations (:func:`betterai_megatron.rl.star.select_kept`), possibly empty;
* ``samples.jsonl`` — every scored answer (``phase``: sample or rationalization, ``passed``, ``kept``);
* ``stats.json`` — :func:`betterai_megatron.rl.star.iteration_stats`.

Sampling seed: ``train.seed + iteration``, so iterations draw different answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def sample_chat(model, tokenizer, user_messages: list[str], *, samples_per_message: int, temperature: float,
                max_new_tokens: int, seed: int) -> list:
    """``samples_per_message`` chat completions per user message (message-major; all ranks get all results).

    The same prompt rendering and engine call as ``evaluate.generate_completions``, for free-form user turns
    (that function always renders ``user_message(problem)``, so it cannot carry the rationalization hint).
    """
    from megatron.core import parallel_state

    from betterai_megatron.data.chat_template import IM_END, ChatTemplate
    from betterai_megatron.inference.config import SamplingParams
    from betterai_megatron.inference.data_parallel import generate_data_parallel
    from betterai_megatron.inference.engine import GenerationEngine

    template = ChatTemplate(tokenizer, reasoning=True)
    prompts = []
    for message in user_messages:
        ids = template.render_generation_prompt([{"role": "user", "content": message}])
        prompts += [list(ids)] * samples_per_message
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_strings=[IM_END],
                              seed=seed)
    engine = GenerationEngine(model, tokenizer=tokenizer)
    return generate_data_parallel(engine, prompts, sampling, dp_group=parallel_state.get_data_parallel_group())


def _score(problems, completions, *, samples: int, config, phase: str) -> list[dict]:
    from betterai_megatron.eval.evaluate import score_completions

    records = score_completions(problems, completions, num_samples=samples, ks=[1], root_config=config)["records"]
    for record in records:
        record["phase"] = phase
    return records


def run_star_sampling(config, *, output_dir: Path, iteration: int) -> dict | None:
    """Sample, score, rationalize, select (see the module docstring); returns the stats on rank 0, else None."""
    import torch.distributed as dist

    from betterai_megatron.config import ConfigError
    from betterai_megatron.data.tokenizer import build_tokenizer
    from betterai_megatron.eval.evaluate import EvalConfig, generate_completions
    from betterai_megatron.inference.model_loading import load_model_for_inference
    from betterai_megatron.rl import star

    s: star.StarConfig = config.star
    if config.data.tokenizer_model is None:
        raise ConfigError("data.tokenizer_model is not set (the tokenizer the model was trained with)")
    problems = star.load_star_problems(s)
    if not problems:
        raise ConfigError("star: no problems (set star.problems_path or star.dataset)")
    tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
    model = load_model_for_inference(config, config.checkpoint.load_dir)
    seed = config.train.seed + iteration
    sampling = EvalConfig(num_samples=s.samples_per_problem, temperature=s.temperature,
                          max_new_tokens=s.max_new_tokens)
    completions = generate_completions(model, tokenizer, problems, sampling, seed=seed)
    rank = dist.get_rank()
    records: list[dict] = []
    unsolved: list = []
    if rank == 0:
        records = _score(problems, completions, samples=s.samples_per_problem, config=config, phase="sample")
        if s.rationalize:
            unsolved = star.unsolved_problems(problems, records, samples_per_problem=s.samples_per_problem)
    shared = [unsolved]
    dist.broadcast_object_list(shared, src=0)  # every rank must join the rationalization generation
    unsolved = shared[0]
    hinted: list = []
    if unsolved:
        hinted = sample_chat(model, tokenizer, [star.rationalization_message(p) for p in unsolved],
                             samples_per_message=s.samples_per_problem, temperature=s.temperature,
                             max_new_tokens=s.max_new_tokens, seed=seed + 1_000_003)
    stats = None
    if rank == 0:
        kept = star.select_kept(problems, records, samples_per_problem=s.samples_per_problem, source="sample",
                                require_format=s.require_format, max_kept_per_problem=s.max_kept_per_problem)
        hinted_records = []
        if unsolved:
            hinted_records = _score(unsolved, hinted, samples=s.samples_per_problem, config=config,
                                    phase="rationalization")
            kept += star.select_kept(unsolved, hinted_records, samples_per_problem=s.samples_per_problem,
                                     source="rationalization", require_format=s.require_format,
                                     max_kept_per_problem=s.max_kept_per_problem)
        stats = star.iteration_stats(problems, records, kept, samples_per_problem=s.samples_per_problem,
                                     rationalized=len(unsolved))
        star.write_jsonl(output_dir / "kept.jsonl", kept)
        star.write_jsonl(output_dir / "samples.jsonl", records + hinted_records)
        (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        logger.info("STaR iteration %d: pass rate %.3f, %d/%d problems solved, kept %d (%d rationalized)",
                    iteration, stats["pass_rate"], stats["problems_solved"], stats["problems"], stats["kept"],
                    stats["kept_rationalized"])
    dist.barrier()
    return stats


def main(argv: list[str] | None = None) -> int:
    from betterai_megatron.platform.cpu import enable_cpu_execution

    enable_cpu_execution()  # before megatron-core builds anything (a no-op with CUDA)
    from betterai_megatron.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="betterai_megatron.rl.star_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_star_sampling(config, output_dir=Path(args.output_dir), iteration=args.iteration)
    except ConfigError as exc:
        print(f"star_sample: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
