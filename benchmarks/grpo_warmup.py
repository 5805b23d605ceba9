"""A starting point for GRPO benchmarks and tests: a tokenizer and a tiny policy that already knows the answer format.

GRPO improves a policy that sometimes succeeds; it cannot discover the ``<think>...</think>`` + code-block format
from a random model in minutes. The real pipeline gets there by pretraining + SFT on the generator's tasks; this
helper builds the same kind of starting point in minutes on a CPU, *without* being a second SFT stage: it only
strings together existing parts (the built-in task generator, the tokenizer trainer, the SFT dataset with the
reasoning chat template, the pretraining ``train_step`` and the checkpointer) and is used by
``examples/configs/tiny_grpo.yaml``, ``benchmarks/grpo_learning.py`` and ``tests/rl/test_grpo_e2e.py``.

What it writes under ``--out``:

* ``tokenizer.model`` -- a small sentencepiece BPE trained on the texts of every task (chat/reasoning special tokens);
* ``sft.jsonl`` -- ``{"prompt", "response"}`` records: the GRPO user message of each SFT task
  (:func:`betterai_megatron.rl.rollout.problem_user_message`) and a reasoning answer (:func:`reasoning_answer`);
* ``sft_problems.jsonl`` / ``grpo_problems.jsonl`` -- the task split: ``--holdout-fraction`` (default 0.5) of the
  tasks is left out of SFT and written for GRPO, so GRPO is measured on tasks whose solutions the starting policy
  never saw (with 0, GRPO gets the SFT tasks);
* ``checkpoint/`` -- a megatron dist checkpoint after the SFT steps (load it with
  ``checkpoint.load_dir=... checkpoint.load_weights_only=true``);
* ``warmup.json`` -- the paths, the split sizes and the loss curve.

Run: ``python -m benchmarks.grpo_warmup --out runs/grpo_warmup`` (SFT of the tiny preset on half of the level-1
tasks until the mean loss of 10 steps reaches 0.06 -- a few hundred steps, minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from betterai_megatron.data.chat_template import (
    REASONING_SYSTEM_PROMPT,
    format_reasoning_response,
)

DEFAULT_MODEL_OVERRIDES = ("model.preset=tiny",)


def _docstring_sentence(problem) -> str:
    text = problem.prompt.split('"""')[1] if '"""' in problem.prompt else problem.entry_point
    return text.strip().splitlines()[0].strip()


def reasoning_answer(problem) -> str:
    """The assistant answer taught before GRPO: a short reasoning, then the whole function in one block."""
    body = problem.canonical_solution or "    pass\n"
    statements = [line.strip() for line in body.splitlines() if line.strip()]
    signature = problem.prompt.splitlines()[0]
    steps = [_docstring_sentence(problem)]
    if len(statements) == 1 and statements[0].startswith("return "):
        steps.append(f"So return {statements[0][len('return '):]}.")
    else:
        steps.append(f"That takes {len(statements)} lines.")
    return format_reasoning_response("\n".join(steps), signature + "\n" + body.rstrip("\n"),
                                     language=problem.language)


def generator_problems(levels, *, seed: int = 0):
    from betterai_megatron.data.problems.generator import generate_problems

    return generate_problems(seed=seed, levels=tuple(levels))


def write_sft_records(path: Path, problems) -> int:
    from betterai_megatron.rl.rollout import problem_user_message

    with open(path, "w") as handle:
        for problem in problems:
            record = {"prompt": problem_user_message(problem), "response": reasoning_answer(problem)}
            handle.write(json.dumps(record) + "\n")
    return len(problems)


def train_small_tokenizer(prefix: Path, problems, *, vocab_size: int = 512) -> str:
    """A BPE tokenizer for the tiny models: trained on exactly the texts the policy will read and write."""
    from betterai_megatron.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_tokenizer,
    )
    from betterai_megatron.rl.rollout import problem_user_message

    texts = [REASONING_SYSTEM_PROMPT + "\n" + problem_user_message(p) + "\n" + reasoning_answer(p) for p in problems]
    config = TokenizerTrainingConfig(vocab_size=vocab_size, num_threads=1, input_sentence_size=0)
    return train_tokenizer(texts, str(prefix), config=config)


def split_problems(problems, *, holdout_fraction: float, seed: int) -> tuple[list, list]:
    """``(sft, held_out)``: a seeded shuffle of the tasks cut at ``holdout_fraction`` (held out from SFT, for GRPO)."""
    import random

    order = list(problems)
    random.Random(seed).shuffle(order)
    cut = round(len(order) * holdout_fraction)
    return order[cut:], order[:cut]


def warm_up(out_dir: Path, *, steps: int, seed: int, levels, lr: float = 3e-3, seq_length: int = 144,
            global_batch_size: int = 16, micro_batch_size: int = 16, model_overrides=DEFAULT_MODEL_OVERRIDES,
            vocab_size: int = 512, save_every: int | None = None, target_loss: float | None = None,
            holdout_fraction: float = 0.0) -> dict:
    """Train the starting policy in this process (one rank, gloo) and save it; returns ``warmup.json``'s dict.

    With ``target_loss``, training stops as soon as the mean loss of the last 10 steps is at most that (``steps``
    is then a cap): the starting policy then has about the same quality whatever the seed or the machine. Small
    models learn to copy the constant from the function name in a sudden drop of the loss (an induction circuit
    forming); a target just past that drop gives a policy that solves some samples of most tasks -- the regime in
    which GRPO has a signal to learn from.
    """
    from betterai_megatron.data.problems import write_problems_jsonl

    out_dir.mkdir(parents=True, exist_ok=True)
    problems, held_out = split_problems(generator_problems(levels), holdout_fraction=holdout_fraction, seed=seed)
    # the tokenizer sees every task's text (as the pipeline's tokenizer sees its whole corpus); SFT only ``problems``
    tokenizer_path = train_small_tokenizer(out_dir / "tokenizer", problems + held_out, vocab_size=vocab_size)
    write_sft_records(out_dir / "sft.jsonl", problems)
    write_problems_jsonl(out_dir / "sft_problems.jsonl", problems)
    write_problems_jsonl(out_dir / "grpo_problems.jsonl", held_out or problems)

    from betterai_megatron.config import load_config
    from betterai_megatron.data.sft_dataset import SftDataConfig, build_sft_datasets
    from betterai_megatron.data.tokenizer import build_tokenizer
    from betterai_megatron.model.builder import build_model_chunks
    from betterai_megatron.parallel.layout import destroy_parallel, initialize_parallel
    from betterai_megatron.platform.distributed import init_distributed
    from betterai_megatron.training.checkpointing import Checkpointer
    from betterai_megatron.training.optimizer import build_optimizer, build_scheduler
    from betterai_megatron.training.trainer import (
        TrainingState,
        attach_schedule_hooks,
        train_step,
        wrap_with_ddp,
    )

    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_path)
    overrides = [*model_overrides, f"model.vocab_size={tokenizer.vocab_size}", "data.mock=true",
                 f"train.steps={steps}", f"train.seed={seed}", f"train.seq_length={seq_length}",
                 f"train.micro_batch_size={micro_batch_size}", f"train.global_batch_size={global_batch_size}",
                 f"train.lr={lr}", "train.lr_decay_style=constant", "train.weight_decay=0.0",
                 f"run.dir={out_dir}", "parallel.backend=gloo", f"checkpoint.dir={out_dir / 'checkpoint'}"]
    config = load_config(None, overrides)
    info = init_distributed(backend="gloo")
    ranks = initialize_parallel(config.parallel, seed=seed)
    chunks, transformer_config = build_model_chunks(model=config.model, parallel=config.parallel,
                                                    seq_length=seq_length, seed=seed)
    chunks = wrap_with_ddp(chunks, transformer_config=transformer_config, config=config)
    optimizer = build_optimizer(train=config.train, model=config.model, parallel=config.parallel, chunks=chunks)
    scheduler = build_scheduler(train=config.train, optimizer=optimizer)
    attach_schedule_hooks(transformer_config, chunks=chunks, optimizer=optimizer, config=config)
    dataset, _ = build_sft_datasets(
        config=SftDataConfig(paths=[str(out_dir / "sft.jsonl")], reasoning=True, valid_fraction=0.0),
        tokenizer=tokenizer, seq_length=seq_length, seed=seed, train_samples=steps * global_batch_size)
    checkpointer = Checkpointer(checkpoint=config.checkpoint, run_dir=out_dir, parallel=config.parallel)
    state = TrainingState()
    losses = []
    for step in range(1, steps + 1):
        result = train_step(chunks=chunks, optimizer=optimizer, scheduler=scheduler, dataset=dataset, state=state,
                            config=config, num_micro_batches=global_batch_size // micro_batch_size, ranks=ranks)
        losses.append(round(result.loss, 5))
        reached = target_loss is not None and len(losses) >= 10 and sum(losses[-10:]) / 10 <= target_loss
        if step == steps or reached or (save_every and step % save_every == 0):
            checkpointer.save(chunks=chunks, optimizer=optimizer, scheduler=scheduler, training_state=vars(state))
        if reached:
            break
    checkpointer.close()
    destroy_parallel()
    summary = {"tokenizer_model": tokenizer_path, "checkpoint_dir": str(out_dir / "checkpoint"),
               "vocab_size": tokenizer.vocab_size, "model_overrides": list(model_overrides), "steps": steps,
               "levels": list(levels), "num_problems": len(problems), "num_held_out": len(held_out),
               "holdout_fraction": holdout_fraction, "sft_problems": str(out_dir / "sft_problems.jsonl"),
               "grpo_problems": str(out_dir / "grpo_problems.jsonl"), "losses": losses, "rank": info.rank,
               "steps_done": len(losses), "target_loss": target_loss, "seed": seed}
    (out_dir / "warmup.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/grpo_warmup"),
                        help="output directory (default: where examples/configs/tiny_grpo.yaml looks)")
    parser.add_argument("--steps", type=int, default=800, help="SFT steps (the cap, with --target-loss)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--levels", default="1", help="comma-separated generator levels")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seq-length", type=int, default=144)
    parser.add_argument("--save-every", type=int, default=None, help="also keep checkpoints every N steps")
    parser.add_argument("--target-loss", type=float, default=0.06,
                        help="stop once the mean loss of the last 10 steps is at most this (--steps is the cap)")
    parser.add_argument("--holdout-fraction", type=float, default=0.5,
                        help="fraction of the tasks left out of SFT: grpo_problems.jsonl (0: GRPO on the SFT tasks)")
    parser.add_argument("--model", nargs="*", default=list(DEFAULT_MODEL_OVERRIDES),
                        help="model.* overrides, e.g. model.preset=tiny model.num_layers=4")
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    summary = warm_up(args.out, steps=args.steps, seed=args.seed, levels=levels, lr=args.lr,
                      seq_length=args.seq_length, model_overrides=tuple(args.model), save_every=args.save_every,
                      target_loss=args.target_loss, holdout_fraction=args.holdout_fraction)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    print("loss: first", summary["losses"][:3], "last", summary["losses"][-3:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
