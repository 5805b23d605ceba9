"""The GRPO stage: problems -> rollouts -> rewards -> advantages -> policy updates, step after step.

One GRPO step (``train.steps`` of them; Shao et al. 2024, arXiv:2402.03300, Algorithm 1 with mu = updates per step):

1. problems from the pass-rate curriculum (``rewards.curriculum``), ``rollout.samples_per_prompt`` trajectories each
   from the generation engine on the *trainer's own model* (so the generator always has the newest weights), grown
   into trees when ``rollout.tree.depth > 1`` (:mod:`.rollout`, :mod:`.tree_rollout`);
2. rewards from running the extracted code against the tests in the sandbox, plus format reward and length penalty
   (``rewards``), the running pass rates updated; DAPO dynamic sampling drops all-pass / all-fail groups and refills;
3. group-normalised advantages (``grpo``), difficulty-weighted;
4. ``rollout.epochs_per_step`` passes of clipped-surrogate updates over mini-batches (:mod:`.policy_update`), after
   the old (and reference) log-probs were recomputed by the trainer;
5. ``<run.dir>/trajectories/step_N.jsonl`` (per trajectory: prompt, response, reasoning, code, test status and
   tests passed, reward and its parts, advantage, kept, and its path through the group's tree: ``segment_nodes``,
   ``segment_tokens``, ``segment_advantages``),
   ``metrics.jsonl`` and TensorBoard.

Batch sizes: ``rollout.prompts_per_step`` x ``rollout.leaves_per_prompt`` trajectories per step, optimiser steps over
``rollout.mini_batch_size_trajectories``, micro-batches of ``train.micro_batch_size`` trajectories per rank
(``train.global_batch_size`` is not used; it is set to one micro-batch per data-parallel rank for the layout checks).
The learning-rate schedule advances once per GRPO step (``train.steps`` steps), whatever the optimiser steps.

The policy starts from ``checkpoint.load_dir`` (weights only, e.g. the SFT stage) and the run resumes from its own
``checkpoint.dir`` when that holds a checkpoint (the curriculum state is kept beside it in
``<run.dir>/grpo_state.json``); SIGTERM/SIGUSR1 and ``train.exit_duration_mins`` stop it after the current step with
a checkpoint (:mod:`betterai_megatron.training.signals`, agreed across ranks). Layouts: tensor and data parallelism
and their mix (what the generation engine supports); pp, cp and ep are refused with a message.

Records (``metrics.jsonl`` keys, the trajectories files): :mod:`.grpo_records`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from betterai_megatron.config import Config, ConfigError, dump_yaml, validate_layout
from betterai_megatron.rl.grpo_records import step_record, write_trajectories

logger = logging.getLogger(__name__)


def validate_grpo_config(config: Config) -> None:
    """What GRPO needs beyond the static checks (one ConfigError naming every problem)."""
    p, m = config.parallel, config.model
    problems = []
    for key, value in (("parallel.pp", p.pp), ("parallel.cp", p.cp), ("parallel.ep", p.ep)):
        if value != 1:
            problems.append(f"{key}={value}: GRPO generates with the trainer's model, and the generation engine "
                            "supports tensor and data parallelism only; set it to 1")
    if p.vpp and p.vpp > 1:
        problems.append(f"parallel.vpp={p.vpp}: no virtual pipeline stages in GRPO (set it to null)")
    for key, value in (("model.hidden_dropout", m.hidden_dropout), ("model.attention_dropout", m.attention_dropout)):
        if value != 0:
            problems.append(f"{key}={value}: GRPO needs dropout 0, otherwise the recomputed old log-probs and the "
                            "update's log-probs differ and the importance ratio is not 1 on the first update")
    if not config.data.tokenizer_model:
        problems.append("data.tokenizer_model is not set: GRPO needs the tokenizer of the policy's checkpoint")
    elif not Path(config.data.tokenizer_model).exists():
        problems.append(f"data.tokenizer_model={config.data.tokenizer_model}: no such file or directory{_WARMUP_HINT}")
    problems += _checkpoint_problems(config)
    from betterai_megatron.data.problems import DATASET_NAMES

    if config.rollout.problems not in DATASET_NAMES and not Path(config.rollout.problems).is_file():
        problems.append(f"rollout.problems={config.rollout.problems}: neither a built-in problem set "
                        f"({', '.join(DATASET_NAMES)}) nor a problems .jsonl file{_WARMUP_HINT}")
    r = config.rollout
    if r.mini_batch_size_trajectories < config.train.micro_batch_size:
        problems.append(f"rollout.mini_batch_size_trajectories={r.mini_batch_size_trajectories} is smaller than "
                        f"train.micro_batch_size={config.train.micro_batch_size}")
    if problems:
        raise ConfigError("invalid GRPO config:\n  - " + "\n  - ".join(problems))


_WARMUP_HINT = (" (the starting policy's tokenizer and checkpoint come from the SFT stage, or for "
                "examples/configs/tiny_grpo.yaml from `python -m benchmarks.grpo_warmup --out runs/grpo_warmup`)")


def _checkpoint_problems(config: Config) -> list[str]:
    """``checkpoint.load_dir`` must hold a checkpoint unless the run resumes from its own ``checkpoint.dir``."""
    from betterai_megatron.training import checkpoint_files as files

    c = config.checkpoint
    if c.load_weights_only and not c.load_dir:
        return ["checkpoint.load_weights_only=true needs checkpoint.load_dir"]
    own = Path(c.dir) if c.dir else Path(config.run.dir) / "checkpoints"
    if not c.load_dir or files.read_tracker(own) is not None:
        return []
    if files.read_tracker(c.load_dir) is None:
        return [(f"checkpoint.load_dir={c.load_dir}: no completed checkpoint there "
                 f"({files.TRACKER_FILENAME} missing){_WARMUP_HINT}")]
    return []


def load_rollout_problems(config: Config, *, template) -> list:
    """The problems of ``rollout.problems``, filtered by level, language and length (each filter is logged)."""
    from betterai_megatron.data.problems import load_problems
    from betterai_megatron.rl.rollout import problem_messages

    r = config.rollout
    try:
        problems = load_problems(r.problems)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"rollout.problems={r.problems!r}: {exc}") from exc
    if r.levels is not None:
        problems = [p for p in problems if p.level in set(r.levels)]
    languages = set(config.sandbox.languages)
    problems = [p for p in problems if p.language in languages]
    if r.max_problems is not None:
        problems = problems[: r.max_problems]
    fitting = [p for p in problems
               if len(template.render_generation_prompt(problem_messages(p))) + r.max_new_tokens
               <= config.train.seq_length]
    if len(fitting) < len(problems):
        logger.warning("%d of %d problems dropped: prompt + rollout.max_new_tokens=%d exceeds train.seq_length=%d",
                       len(problems) - len(fitting), len(problems), r.max_new_tokens, config.train.seq_length)
    if not fitting:
        raise ConfigError(f"rollout.problems={r.problems!r} with rollout.levels={r.levels}: no problem left (after "
                          f"the level, sandbox.languages and train.seq_length={config.train.seq_length} filters)")
    return fitting


@dataclass
class _Parts:
    """Everything a GRPO run holds between steps."""

    config: Config
    rank: int
    world_size: int
    chunks: list
    optimizer: object
    scheduler: object
    checkpointer: object
    reference: list | None
    curriculum: object
    tracker: object
    scorer: object
    executor: object
    sampler: object
    metrics: object
    run_dir: Path
    dp_group: object
    dp_rank: int
    dp_size: int
    pad_token_id: int


def run_grpo(config: Config):
    """Run ``train.steps`` GRPO steps (resuming if ``checkpoint.dir`` holds a checkpoint); returns the state."""
    from betterai_megatron.parallel.layout import destroy_parallel
    from betterai_megatron.platform.distributed import init_distributed

    info = init_distributed(backend=config.parallel.backend)
    config = _with_grpo_batch_sizes(config, world_size=info.world_size)
    validate_layout(config, info.world_size)
    validate_grpo_config(config)
    parts, state = _build(config, rank=info.rank, world_size=info.world_size)
    from betterai_megatron.training.signals import StopRequest

    stop = StopRequest(exit_duration_mins=config.train.exit_duration_mins).install()
    saved_step = state.step if state.step else None  # resumed: that checkpoint exists already
    try:
        while state.step < config.train.steps:
            record = run_step(parts, state)
            _log(parts, record)
            reason = _agreed_stop_reason(stop)
            interval = config.checkpoint.save_interval
            if reason or (interval and state.step % interval == 0):
                _save(parts, state)
                saved_step = state.step
            if reason:
                if parts.rank == 0:
                    logger.warning("stopping after GRPO step %d: %s (checkpoint saved)", state.step,
                                   stop.describe(reason))
                break
        if config.checkpoint.save_on_exit and saved_step != state.step:
            _save(parts, state)
    finally:
        stop.restore()
        parts.executor.close()
        parts.metrics.close()
    parts.checkpointer.close()
    if dist.is_initialized():
        dist.barrier()
    destroy_parallel()
    return state


def _agreed_stop_reason(stop) -> int:
    """Preemption (SIGTERM/SIGUSR1) or ``train.exit_duration_mins`` on any rank: every rank stops after this step."""
    reason = stop.local_reason()
    if dist.is_initialized() and dist.get_world_size() > 1:
        import torch

        from betterai_megatron.rl.policy_update import _device

        tensor = torch.tensor([reason], dtype=torch.int64, device=_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        reason = int(tensor.item())
    return reason


def _with_grpo_batch_sizes(config: Config, *, world_size: int) -> Config:
    """GRPO's optimiser steps are over ``rollout.mini_batch_size_trajectories``, not ``train.global_batch_size``;
    the latter is set to one micro-batch per data-parallel rank so the pretraining layout checks stay meaningful."""
    from betterai_megatron.config.root import data_parallel_size

    p = config.parallel
    if world_size % (p.tp * p.pp * p.cp):
        return config  # validate_layout reports it
    batch = config.train.micro_batch_size * data_parallel_size(config, world_size)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, global_batch_size=batch))


def _sandbox_for_rank(config: Config):
    """``sandbox.workers=0`` means one worker per core *per node*: split the cores among this node's ranks."""
    sandbox = config.sandbox
    if sandbox.workers:
        return sandbox
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return dataclasses.replace(sandbox, workers=max(1, sandbox.num_workers // max(local_ranks, 1)))


def _build(config: Config, *, rank: int, world_size: int):
    from megatron.core import parallel_state

    from betterai_megatron.data.chat_template import ChatTemplate
    from betterai_megatron.data.sft_dataset import padding_token_id
    from betterai_megatron.data.tokenizer import build_tokenizer
    from betterai_megatron.inference.config import GenerationConfig
    from betterai_megatron.inference.engine import GenerationEngine
    from betterai_megatron.parallel.layout import initialize_parallel
    from betterai_megatron.rewards.executor import CodeExecutor
    from betterai_megatron.rewards.rollout_scoring import RolloutScorer
    from betterai_megatron.rl.reference_policy import build_reference_policy
    from betterai_megatron.rl.rollout import RolloutSampler
    from betterai_megatron.training.metrics import MetricsWriter
    from betterai_megatron.training.pretrain import build_trainable_model
    from betterai_megatron.training.trainer import (
        TrainingState,
    )

    t, r = config.train, config.rollout
    ranks = initialize_parallel(config.parallel, seed=t.seed)
    run_dir = Path(config.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, run_dir / "config.yaml")
    tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"data.tokenizer_model has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={config.model.vocab_size}")
    # the conversation format of the SFT stage: same template, same system prompt (data.sft.system_prompt)
    template = ChatTemplate(tokenizer, system_prompt=config.data.sft.system_prompt, reasoning=True)
    chunks, optimizer, scheduler, checkpointer, loaded = build_trainable_model(config, run_dir=run_dir)
    state = TrainingState(**loaded.training_state) if loaded is not None else TrainingState()
    if loaded is None and rank == 0:
        logger.warning("GRPO starts from a freshly initialised model (no checkpoint in checkpoint.dir and no "
                       "checkpoint.load_dir): rewards stay near 0 until the model knows the answer format")
    reference = (build_reference_policy(config=config, seq_length=t.seq_length)
                 if config.grpo.needs_reference_model else None)
    problems, tracker, curriculum = _build_curriculum(config, template=template, run_dir=run_dir, step=state.step,
                                                      rank=rank)
    # The checkpointer forks a results-queue manager at its first save; forked after the sandbox server, it would
    # inherit the server's request pipe, and closing the executor would wait 10 s for an EOF that never comes.
    # Fork it now, before the pipe exists.
    from betterai_megatron.training.checkpointing import start_checkpoint_results_queue

    start_checkpoint_results_queue()
    executor = CodeExecutor(_sandbox_for_rank(config))
    scorer = RolloutScorer(config.rewards, executor)
    engine = GenerationEngine(chunks[0], tokenizer=tokenizer,
                              config=GenerationConfig(max_batch_size=r.generation_batch_size))
    dp_group = parallel_state.get_data_parallel_group()
    sampler = RolloutSampler(engine=engine, tokenizer=tokenizer, template=template, config=r, seed=t.seed,
                             dp_group=dp_group)
    metrics = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=config.log.tensorboard, total_steps=t.steps,
                            first_step=state.step)
    if rank == 0:
        logger.info("GRPO: %d problems from %r, %d prompts x %d leaves per step, layout tp=%d dp=%d",
                    len(problems), r.problems, r.prompts_per_step, r.leaves_per_prompt, config.parallel.tp,
                    ranks.dp_size)
    parts = _Parts(config=config, rank=rank, world_size=world_size, chunks=chunks, optimizer=optimizer,
                   scheduler=scheduler, checkpointer=checkpointer, reference=reference, curriculum=curriculum,
                   tracker=tracker, scorer=scorer, executor=executor, sampler=sampler, metrics=metrics,
                   run_dir=run_dir, dp_group=dp_group, dp_rank=ranks.dp_rank, dp_size=ranks.dp_size,
                   pad_token_id=padding_token_id(tokenizer))
    return parts, state


def _build_curriculum(config: Config, *, template, run_dir: Path, step: int, rank: int):
    """``(problems, pass-rate tracker, curriculum sampler)``, restored from ``grpo_state.json`` when resuming."""
    from betterai_megatron.rewards.curriculum import PassRateCurriculumSampler
    from betterai_megatron.rewards.difficulty import PassRateTracker

    problems = load_rollout_problems(config, template=template)
    cur = config.rewards.curriculum
    tracker = PassRateTracker(prior_strength=cur.prior_strength, decay=cur.decay)
    curriculum = PassRateCurriculumSampler(problems, tracker, weighting=cur.weighting, min_weight=cur.min_weight,
                                           target=cur.target, width=cur.width,
                                           unlock_pass_rate=cur.unlock_pass_rate, seed=config.train.seed)
    _restore_side_state(run_dir, step=step, tracker=tracker, curriculum=curriculum, rank=rank)
    return problems, tracker, curriculum


# ----------------------------------------------------------------------------------------------- one step

def run_step(parts: _Parts, state) -> dict:
    """One GRPO step (module docstring); advances ``state`` and returns the metrics record."""
    from betterai_megatron.rl.policy_update import (
        UpdatePlan,
        UpdateResult,
        build_mini_batches,
        compute_log_probs,
        log_prob_mismatch,
        run_policy_updates,
        with_response_length_default,
    )
    from betterai_megatron.rl.rollout import (
        assign_advantages,
        collect_groups,
        group_filter_predicate,
        score_groups,
    )

    config, sampler = parts.config, parts.sampler
    r = config.rollout
    step = state.step + 1
    start = time.perf_counter()
    sampler.generated_tokens, sampler.generation_seconds, sampler.prefill_tokens = 0, 0.0, 0
    timing = {"scoring_s": 0.0}
    programs = [0]
    next_group_id = [0]

    def sample_round(round_index: int, count: int):
        problems = parts.curriculum.sample(count)
        groups = sampler.sample(problems, step=step, round_index=round_index, first_group_id=next_group_id[0])
        next_group_id[0] += len(groups)
        scoring_start = time.perf_counter()
        programs[0] += score_groups(groups, scorer=parts.scorer, rank=parts.rank, world_size=parts.world_size)
        timing["scoring_s"] += time.perf_counter() - scoring_start
        trajectories = [t for g in groups for t in g.trajectories]
        parts.scorer.update_tracker(parts.tracker, [t.problem.task_id for t in trajectories],
                                    _tensor([t.scored.test_reward for t in trajectories]))
        return groups

    collected = collect_groups(sample_round=sample_round, keep_group=group_filter_predicate(parts.scorer),
                               prompts_per_step=r.prompts_per_step, max_refill_rounds=r.max_refill_rounds,
                               refill=config.rewards.group_filter != "none")
    assign_advantages(collected.generated, grpo=config.grpo, scorer=parts.scorer, tracker=parts.tracker)
    trained = [t for g in collected.kept for t in g.trajectories]
    grpo = with_response_length_default(config.grpo, max_new_tokens=r.max_new_tokens)
    plan = UpdatePlan(micro_batch_size=config.train.micro_batch_size,
                      mini_batch_size_trajectories=r.mini_batch_size_trajectories, epochs=r.epochs_per_step,
                      dp_rank=parts.dp_rank, dp_size=parts.dp_size, shuffle=r.shuffle_trajectories,
                      seed=config.train.seed * 100_003 + step, pad_token_id=parts.pad_token_id)
    update = UpdateResult()
    logprob_s, mismatch = 0.0, (0.0, 0.0)
    if trained:
        mini_batches = build_mini_batches(trained, plan=plan, overlong_filtering=grpo.overlong_filtering)
        logprob_s = compute_log_probs(parts.chunks[0], mini_batches, key="old_log_probs")
        mismatch = log_prob_mismatch(mini_batches, dp_group=parts.dp_group)
        if parts.reference is not None:
            logprob_s += compute_log_probs(parts.reference[0], mini_batches, key="ref_log_probs")
        update = run_policy_updates(chunks=parts.chunks, optimizer=parts.optimizer, mini_batches=mini_batches,
                                    grpo=grpo, plan=plan, dp_group=parts.dp_group)
        update.trained_tokens = _all_reduce_int(update.trained_tokens, parts.dp_group)
    elif parts.rank == 0:
        logger.warning("step %d: no group survived the group filter after %d round(s); no update", step,
                       collected.rounds)
    parts.scheduler.step(increment=1)
    state.step = step
    state.consumed_samples += len(trained)
    state.skipped_steps += update.skipped_steps
    if parts.rank == 0 and r.write_trajectories:
        write_trajectories(parts.run_dir / "trajectories" / f"step_{step}.jsonl", collected.generated, step=step)
    timing.update(generation_s=sampler.generation_seconds, logprob_s=logprob_s, update_s=update.seconds,
                  step_time_s=time.perf_counter() - start)
    if trained:
        update.metrics.update(logprob_mismatch_max=mismatch[0], logprob_mismatch_mean=mismatch[1])
    timing["programs_run"] = programs[0]
    return step_record(step=step, collected=collected, update=update, timing=timing, sampler=sampler,
                       lr=float(parts.optimizer.param_groups[0]["lr"]), has_reference=parts.reference is not None,
                       curriculum_level=parts.curriculum.unlocked_level)


def _tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


def _all_reduce_int(value: int, group) -> int:
    if group is None or dist.get_world_size(group) == 1:
        return value
    import torch

    from betterai_megatron.rl.policy_update import _device

    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, group=group)
    return int(tensor.item())


def _log(parts: _Parts, record: dict) -> None:
    interval = parts.config.log.interval
    if record["step"] % interval and record["step"] != parts.config.train.steps:
        return
    parts.metrics.log(record)
    if parts.rank == 0:
        def number(key: str, spec: str) -> str:  # update metrics are null when no group survived the filter
            value = record.get(key)
            return "-" if value is None else format(value, spec)

        print(f" grpo step {record['step']:>5d}/{parts.config.train.steps} | reward {record['reward_mean']:.3f} "
              f"(std {record['reward_std']:.3f}) | pass {record['pass_rate']:.3f} | format "
              f"{record['format_rate']:.3f} | kept groups {record['kept_group_fraction']:.2f} | "
              f"len {record['response_length']:.1f} | kl {number('kl', '.2e')} | clip "
              f"{number('clip_fraction', '.3f')} | entropy {number('entropy', '.3f')} | gen "
              f"{record['generation_tokens_per_s']:.0f} tok/s | train {record['training_tokens_per_s']:.0f} tok/s | "
              f"{record['step_time_s']:.1f} s", flush=True)


# ----------------------------------------------------------------------------------------------- checkpoints

SIDE_STATE_FILE = "grpo_state.json"


def _save(parts: _Parts, state) -> None:
    parts.checkpointer.save(chunks=parts.chunks, optimizer=parts.optimizer, scheduler=parts.scheduler,
                            training_state=vars(state))
    if parts.rank == 0:
        side = {"step": state.step, "tracker": parts.tracker.state_dict(), "curriculum": parts.curriculum.state_dict()}
        tmp = parts.run_dir / f".{SIDE_STATE_FILE}.tmp"
        tmp.write_text(json.dumps(side))
        os.replace(tmp, parts.run_dir / SIDE_STATE_FILE)


def _restore_side_state(run_dir: Path, *, step: int, tracker, curriculum, rank: int) -> None:
    """Pass rates and curriculum position of a resumed run (only if saved at the resumed step)."""
    path = run_dir / SIDE_STATE_FILE
    if step == 0 or not path.exists():
        return
    side = json.loads(path.read_text())
    if side.get("step") != step:
        if rank == 0:
            logger.warning("%s is from step %s, the checkpoint from step %d: the curriculum restarts",
                           path, side.get("step"), step)
        return
    tracker.load_state_dict(side["tracker"])
    curriculum.load_state_dict(side["curriculum"])
