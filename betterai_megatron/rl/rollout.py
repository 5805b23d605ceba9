"""Rollouts for GRPO: the ``rollout`` config section, prompts for problems, sampling, scoring, dynamic sampling.

A GRPO step (Shao et al. 2024, arXiv:2402.03300) samples ``rollout.samples_per_prompt`` trajectories for each of
``rollout.prompts_per_step`` problems; the trajectories of one problem form a *group* (here always a
:class:`~betterai_megatron.rl.tree.TrajectoryTree`: linear GRPO is the tree of depth 1, tree rollouts are built by
:mod:`.tree_rollout`). This module owns

* :class:`RolloutConfig` (section ``rollout``) and :class:`RolloutTreeConfig` (``rollout.tree``);
* the conversation a problem is asked in (:func:`problem_messages`, rendered by the reasoning chat template with
  ``data.sft.system_prompt``) -- SFT data meant to precede GRPO must use the same user turn and system prompt, so
  that the policy starts from the format it was taught;
* :class:`Trajectory` (one root-to-leaf path, what is scored, trained and logged) and :class:`RolloutGroup`;
* scoring a round of groups with the rewards' :class:`~betterai_megatron.rewards.rollout_scoring.RolloutScorer`
  (reward on the extracted code, format reward, length penalty) -- every rank scores a share, results are
  all-gathered so every rank holds the same rewards;
* DAPO dynamic sampling with refill (Yu et al. 2025, arXiv:2503.14476 §3.2; :func:`collect_groups`): groups whose
  rewards are all equal (all pass / all fail) are dropped by ``rewards.group_filter`` and more problems are rolled
  out, up to ``rollout.max_refill_rounds`` extra rounds, until ``prompts_per_step`` groups are kept;
* group advantages (:func:`assign_advantages`): ``grpo.advantage_estimator`` for linear groups, the tree
  advantages of ``grpo.tree_advantage_mode`` for trees, then the difficulty weighting of
  ``rewards.advantage_weighting`` (GRPO-LEAD).

Shapes: token lists are Python lists (ragged); per-token advantages and loss weights of a trajectory are
``[L]`` float32 tensors, ``L`` its response length in tokens.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from betterai_megatron.rl.tree import TrajectoryTree, flatten_tree, segment_advantages

BRANCH_POINTS = ("newline",)


@dataclass
class RolloutTreeConfig:
    """``rollout.tree``: tree-structured rollouts (:mod:`.tree_rollout`). ``depth: 1`` is linear GRPO.

    Every path has ``depth`` segments; each of the ``samples_per_prompt`` first samples branches ``depth - 1``
    times, each time into ``branching`` continuations, so a prompt gets
    ``samples_per_prompt * branching ** (depth - 1)`` leaves.
    """

    depth: int = 1
    branching: int = 2
    branch_at: str = "newline"  # branch points: after a line of the reasoning (inside <think>...</think>)
    min_continuation_tokens: int = 8  # no branch point closer than this to the token budget


@dataclass
class RolloutConfig:
    """The ``rollout`` section: what a GRPO step samples, and how the samples are trained on.

    Units are in the names: ``*_trajectories`` counts root-to-leaf paths (one sequence each).
    """

    problems: str = "generated"  # problem source: humaneval | leetcode | generated | a problems .jsonl
    levels: list[int] | None = None  # keep only problems of these difficulty levels (null: all)
    max_problems: int | None = None  # keep at most this many (after the level filter; null: all)
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 128  # response budget of a whole trajectory (all segments of a tree path)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int = 64  # rows decoded together per model replica
    # DAPO dynamic sampling: with rewards.group_filter=dapo, roll out up to this many extra rounds of problems to
    # replace dropped groups (0: drop without refill). Inactive with rewards.group_filter=none.
    max_refill_rounds: int = 2
    # Policy updates on one step's trajectories: epochs over them, split into mini-batches (one optimiser step
    # each) of this many trajectories; micro-batches are train.micro_batch_size trajectories per dp rank.
    epochs_per_step: int = 1
    mini_batch_size_trajectories: int = 64
    shuffle_trajectories: bool = True  # shuffle once per step before splitting into mini-batches
    write_trajectories: bool = True  # <run.dir>/trajectories/step_N.jsonl
    tree: RolloutTreeConfig = field(default_factory=RolloutTreeConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tree, dict):
            self.tree = RolloutTreeConfig(**self.tree)
        self.validate()

    def validate(self, section: str = "rollout") -> None:
        """Raise one ``ValueError`` listing every bad value as ``<section>.<key>: problem``."""
        found = self.problems_found(section)
        if found:
            raise ValueError("; ".join(found))

    def problems_found(self, section: str = "rollout") -> list[str]:
        found: list[str] = []

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                found.append(f"{section}.{key}: {message}")

        for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "generation_batch_size",
                    "epochs_per_step", "mini_batch_size_trajectories"):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= 1, key, f"must be an integer >= 1, got {value!r}")
        check(self.temperature > 0, "temperature", f"must be > 0 (GRPO needs sampled groups), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = no limit), got {self.top_k}")
        check(self.max_refill_rounds >= 0, "max_refill_rounds", f"must be >= 0, got {self.max_refill_rounds}")
        check(self.max_problems is None or self.max_problems >= 1, "max_problems",
              f"must be >= 1 or null, got {self.max_problems}")
        if self.levels is not None:
            check(bool(self.levels) and all(isinstance(v, int) and 0 <= v <= 5 for v in self.levels), "levels",
                  f"must be null or a non-empty list of levels in 0..5, got {self.levels}")
        tree = self.tree
        check(tree.depth >= 1, "tree.depth", f"must be >= 1 (1 = linear GRPO), got {tree.depth}")
        check(tree.branching >= 2 or tree.depth == 1, "tree.branching",
              f"must be >= 2 for a tree (rollout.tree.depth={tree.depth}), got {tree.branching}")
        check(tree.branch_at in BRANCH_POINTS, "tree.branch_at",
              f"unknown value {tree.branch_at!r}; valid values: {', '.join(map(repr, BRANCH_POINTS))}")
        check(tree.min_continuation_tokens >= 1, "tree.min_continuation_tokens",
              f"must be >= 1, got {tree.min_continuation_tokens}")
        return found

    @property
    def leaves_per_prompt(self) -> int:
        return self.samples_per_prompt * self.tree.branching ** (self.tree.depth - 1)


# --------------------------------------------------------------------------------------------- prompts

def problem_user_message(problem) -> str:
    """The user turn for a problem: the function to complete, in a fenced block of its language. The one place this
    text is defined: the pipeline's SFT data, STaR and evaluation ask with it too
    (:func:`betterai_megatron.pipeline.demo_data.user_message` delegates here)."""
    language = problem.language
    return f"Complete this {language} function.\n```{language}\n{problem.prompt.rstrip(chr(10))}\n```"


def problem_messages(problem) -> list[dict[str, str]]:
    """``[{"role": "user", ...}]``: the conversation a problem is asked in (the chat template adds the reasoning
    system prompt). The answer the reward expects: ``<think>...</think>`` then one fenced block holding the whole
    function (the program run is ``problem.prompt + code``, so a full definition replaces the stub)."""
    return [{"role": "user", "content": problem_user_message(problem)}]


# --------------------------------------------------------------------------------------------- data types

@dataclass
class Trajectory:
    """One root-to-leaf path of a group: sampled, then scored, then given advantages."""

    problem: object  # betterai_megatron.data.problems.Problem
    group_id: int  # the group's index in this step (all rounds)
    leaf: int  # its leaf node in the group's tree
    prompt_token_ids: list[int]
    response_token_ids: list[int]  # [L] the path's segments, including the closing stop token if sampled
    finish_reason: str  # "eod" | "stop" | "length" (of the last segment)
    text: str = ""  # response text, cut before the stop string
    sampled_log_probs: list[float] | None = None  # [L] log-probs the engine reported while sampling
    # scoring
    reward: float = 0.0
    scored: object | None = None  # rewards.rollout_scoring.ScoredResponse
    format_ok: bool = False
    # advantages (assign_advantages)
    advantage: float = 0.0  # the sequence advantage (linear) or the leaf segment's advantage (tree)
    token_advantages: torch.Tensor | None = None  # [L] float32
    token_weights: torch.Tensor | None = None  # [L] float32 loss weights (tree prefix weighting), 1 for linear

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def passed(self) -> bool:
        verdict = getattr(self.scored, "verdict", None)
        return bool(verdict is not None and verdict.passed)


@dataclass
class RolloutGroup:
    """All trajectories of one problem: its tree and the leaves' trajectories (depth-first order)."""

    problem: object
    group_id: int
    round_index: int  # dynamic-sampling round that produced it (0 = first)
    tree: TrajectoryTree
    trajectories: list[Trajectory]
    kept: bool = True  # survived the group filter (and the truncation to prompts_per_step)

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([t.reward for t in self.trajectories], dtype=torch.float64)


def response_text(tokenizer, token_ids: Sequence[int], stop_strings: Sequence[str]) -> str:
    """Detokenised response, cut before the first stop string (what the engine's ``text`` holds)."""
    text = tokenizer.detokenize(list(token_ids))
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


# --------------------------------------------------------------------------------------------- sampling

def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (train seed, step, round, ...): stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RolloutSampler:
    """Samples groups for problems with the generation engine; every rank calls it with the same problems.

    ``engine`` generates on this model replica (tp inside); with ``dp_group`` the prompts are spread over the
    data-parallel replicas and every rank gets all results back
    (:func:`~betterai_megatron.inference.data_parallel.generate_data_parallel`). Rows stop at the chat template's
    end-of-turn marker ``<|im_end|>`` (kept as the last response token, so the policy learns to stop) or at EOD.
    """

    def __init__(self, *, engine, tokenizer, template, config: RolloutConfig, seed: int, dp_group=None) -> None:
        from betterai_megatron.data.chat_template import IM_END

        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.config = config
        self.seed = seed
        self.dp_group = dp_group
        self.stop_strings = [IM_END]
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self.prefill_tokens = 0  # prompt (+ shared prefix) tokens fed to the engine

    def prompt_token_ids(self, problem) -> list[int]:
        return self.template.render_generation_prompt(problem_messages(problem))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int) -> list:
        """``GenerationResult`` per prompt (same order), sampled with the rollout's temperature/top-p/top-k."""
        from betterai_megatron.inference.config import SamplingParams
        from betterai_megatron.inference.data_parallel import generate_data_parallel

        c = self.config
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                top_k=c.top_k, stop_strings=self.stop_strings, stop_at_eod=True, seed=seed)
        start = time.perf_counter()
        results = generate_data_parallel(self.engine, prompts, params, dp_group=self.dp_group)
        self.generation_seconds += time.perf_counter() - start
        self.generated_tokens += sum(len(r.tokens) for r in results)
        self.prefill_tokens += sum(r.prompt_tokens_computed for r in results)  # shared prompt prefixes count once
        return results

    def sample(self, problems: Sequence, *, step: int, round_index: int, first_group_id: int) -> list[RolloutGroup]:
        """``samples_per_prompt`` linear samples per problem, grown into trees when ``rollout.tree.depth > 1``."""
        c = self.config
        prompts = [self.prompt_token_ids(p) for p in problems]
        expanded = [prompt for prompt in prompts for _ in range(c.samples_per_prompt)]
        results = self.generate(expanded, max_new_tokens=c.max_new_tokens,
                                seed=derived_seed(self.seed, step, round_index, 1))
        groups = []
        for index, (problem, prompt) in enumerate(zip(problems, prompts)):
            group_id = first_group_id + index
            tree = TrajectoryTree.with_prompt(prompt)
            trajectories = []
            for result in results[index * c.samples_per_prompt:(index + 1) * c.samples_per_prompt]:
                leaf = tree.add_segment(0, result.tokens)
                trajectories.append(Trajectory(problem=problem, group_id=group_id, leaf=leaf,
                                               prompt_token_ids=list(prompt), response_token_ids=list(result.tokens),
                                               finish_reason=result.finish_reason, text=result.text,
                                               sampled_log_probs=list(result.log_probs)))
            groups.append(RolloutGroup(problem=problem, group_id=group_id, round_index=round_index, tree=tree,
                                       trajectories=trajectories))
        if c.tree.depth > 1:
            from betterai_megatron.rl.tree_rollout import grow_trees

            grow_trees(groups, sampler=self, step=step, round_index=round_index)
        return groups


# --------------------------------------------------------------------------------------------- scoring

def score_groups(groups: Sequence[RolloutGroup], *, scorer, rank: int = 0, world_size: int = 1,
                 group=None) -> int:
    """Score every trajectory of ``groups`` in place (reward, verdict, format); returns the programs run.

    Identical responses to the same problem (same text and length; common once the policy sharpens) are scored
    once. The distinct ones are dealt round-robin to the ranks (``i % world_size``) and the scores all-gathered, so
    every rank ends with identical rewards (the curriculum and the advantages must agree across ranks). Untrusted
    code runs only in the rewards' sandbox.
    """
    from betterai_megatron.rewards.format_reward import format_reward

    trajectories = [t for g in groups for t in g.trajectories]
    keys = [(t.problem.task_id, t.text, len(t.response_token_ids)) for t in trajectories]
    first_of: dict[tuple, int] = {}
    for index, key in enumerate(keys):
        first_of.setdefault(key, index)
    distinct = list(first_of.values())
    mine = distinct[rank::world_size]
    scored = scorer.score([trajectories[i].problem for i in mine], [trajectories[i].text for i in mine],
                          [len(trajectories[i].response_token_ids) for i in mine]) if mine else []
    results = list(zip(mine, scored))
    if world_size > 1:
        import torch.distributed as dist

        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, results, group=group)
        results = [item for share in gathered for item in share]
    by_index = dict(results)
    for trajectory, key in zip(trajectories, keys):
        result = by_index.get(first_of[key])
        if result is None:
            raise RuntimeError(f"trajectory of task {trajectory.problem.task_id} was not scored")
        trajectory.scored = result
        trajectory.reward = float(result.reward)
        trajectory.format_ok = format_reward(trajectory.text) == 1.0
    return len(distinct)


# --------------------------------------------------------------------------------------------- dynamic sampling

@dataclass
class CollectedGroups:
    """What :func:`collect_groups` gathered for one step."""

    kept: list[RolloutGroup]  # at most prompts_per_step groups to train on
    generated: list[RolloutGroup]  # every group rolled out this step (kept or not), in order
    rounds: int  # rounds of sampling done (1 = no refill)
    passed_filter: int  # groups that passed the filter (before truncation to prompts_per_step)

    @property
    def kept_group_fraction(self) -> float:
        return self.passed_filter / len(self.generated) if self.generated else 0.0


def refill_size(*, missing: int, passed: int, generated: int, prompts_per_step: int) -> int:
    """Problems to roll out in a refill round: the missing groups divided by the keep rate seen so far (at least a
    quarter, so a step whose groups were all filtered does not explode), at most ``prompts_per_step``."""
    keep_rate = max(passed / generated if generated else 1.0, 0.25)
    return max(1, min(prompts_per_step, math.ceil(missing / keep_rate)))


def collect_groups(*, sample_round: Callable[[int, int], list[RolloutGroup]],
                   keep_group: Callable[[RolloutGroup], bool], prompts_per_step: int,
                   max_refill_rounds: int, refill: bool) -> CollectedGroups:
    """DAPO dynamic sampling: roll out, filter, and refill until ``prompts_per_step`` groups pass.

    ``sample_round(round_index, num_problems)`` rolls out and scores ``num_problems`` new groups;
    ``keep_group(group)`` is the group filter. Without ``refill`` (or with ``max_refill_rounds = 0``) there is one
    round and the filtered batch may be smaller. Surplus groups of the last round beyond ``prompts_per_step``
    are marked not kept (their rollouts still count for the pass-rate statistics).
    """
    generated: list[RolloutGroup] = []
    passed: list[RolloutGroup] = []
    rounds = 0
    request = prompts_per_step
    while True:
        new_groups = sample_round(rounds, request)
        rounds += 1
        generated.extend(new_groups)
        for group in new_groups:
            group.kept = keep_group(group)
            if group.kept:
                passed.append(group)
        missing = prompts_per_step - len(passed)
        if missing <= 0 or not refill or rounds > max_refill_rounds:
            break
        request = refill_size(missing=missing, passed=len(passed), generated=len(generated),
                              prompts_per_step=prompts_per_step)
    for group in passed[prompts_per_step:]:
        group.kept = False
    return CollectedGroups(kept=passed[:prompts_per_step], generated=generated, rounds=rounds,
                           passed_filter=len(passed))


def group_filter_predicate(scorer) -> Callable[[RolloutGroup], bool]:
    """``rewards.group_filter`` as a per-group predicate (its functions work on ``[n]`` rewards + group ids)."""

    def keep(group: RolloutGroup) -> bool:
        rewards = group.rewards
        mask = scorer.group_filter(rewards, torch.zeros(rewards.numel(), dtype=torch.long))
        return bool(mask.all())

    return keep


# --------------------------------------------------------------------------------------------- advantages

def assign_advantages(groups: Sequence[RolloutGroup], *, grpo, scorer, tracker=None) -> None:
    """Set ``advantage``, ``token_advantages [L]`` and ``token_weights [L]`` of every trajectory of ``groups``.

    Linear groups (every trajectory a child of the root): ``grpo.advantage_estimator`` over the group's rewards.
    Trees: :func:`~betterai_megatron.rl.tree.segment_advantages` (``grpo.tree_advantage_mode``,
    ``grpo.tree_std_normalize``) and :func:`~betterai_megatron.rl.tree.flatten_tree`
    (``grpo.tree_prefix_weighting``). Then ``rewards.advantage_weighting`` scales the advantages by difficulty.
    """
    linear = [g for g in groups if _is_linear(g)]
    trees = [g for g in groups if not _is_linear(g)]
    if linear:
        _linear_advantages(linear, grpo=grpo, scorer=scorer, tracker=tracker)
    for group in trees:
        _tree_advantages(group, grpo=grpo, scorer=scorer, tracker=tracker)


def _is_linear(group: RolloutGroup) -> bool:
    return all(parent == 0 for parent in group.tree.parents[1:])


def _linear_advantages(groups: Sequence[RolloutGroup], *, grpo, scorer, tracker) -> None:
    from betterai_megatron.rl.advantages import compute_outcome_advantages

    trajectories = [t for g in groups for t in g.trajectories]
    rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
    group_index = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)
    advantages = compute_outcome_advantages(rewards, estimator=grpo.advantage_estimator, group_index=group_index,
                                            eps=grpo.advantage_eps)
    advantages = scorer.weight_advantages(advantages, test_rewards=_test_rewards(trajectories),
                                          group_index=group_index,
                                          task_ids=[t.problem.task_id for t in trajectories], tracker=tracker)
    for trajectory, advantage in zip(trajectories, advantages.tolist()):
        length = len(trajectory.response_token_ids)
        trajectory.advantage = float(advantage)
        trajectory.token_advantages = torch.full((length,), float(advantage), dtype=torch.float32)
        trajectory.token_weights = torch.ones(length, dtype=torch.float32)


def _tree_advantages(group: RolloutGroup, *, grpo, scorer, tracker) -> None:
    tree = group.tree
    for trajectory in group.trajectories:
        tree.set_reward(trajectory.leaf, trajectory.reward)
    node_advantages = segment_advantages(tree, mode=grpo.tree_advantage_mode, std_normalize=grpo.tree_std_normalize,
                                         eps=grpo.advantage_eps)
    node_advantages = _weight_tree_advantages(group, node_advantages, scorer=scorer, tracker=tracker)
    paths = {path.leaf: path for path in flatten_tree(tree, node_advantages,
                                                      prefix_weighting=grpo.tree_prefix_weighting)}
    for trajectory in group.trajectories:
        path = paths[trajectory.leaf]
        if path.response_token_ids != trajectory.response_token_ids:
            raise RuntimeError(f"tree path of leaf {trajectory.leaf} does not match its trajectory's tokens")
        trajectory.advantage = float(node_advantages[trajectory.leaf])
        trajectory.token_advantages = path.token_advantages
        trajectory.token_weights = path.token_weights


def _weight_tree_advantages(group: RolloutGroup, node_advantages: torch.Tensor, *, scorer, tracker) -> torch.Tensor:
    """GRPO-LEAD on tree segments: every segment of the tree is weighted with the tree's pass rate (the group's
    fraction of passing leaves, or the running estimate)."""
    config = scorer.config
    if config.advantage_weighting == "none":
        return node_advantages
    from betterai_megatron.rewards.difficulty_weighting import ADVANTAGE_WEIGHTINGS

    if config.grpo_lead.pass_rate_source == "running":
        if tracker is None:
            raise ValueError("rewards.grpo_lead.pass_rate_source=running needs the pass-rate tracker")
        pass_rate = tracker.pass_rate(group.problem.task_id)
    else:
        tests = _test_rewards(group.trajectories)
        pass_rate = float((tests >= config.success_threshold).double().mean())
    lead = config.grpo_lead
    weighted = ADVANTAGE_WEIGHTINGS.get(config.advantage_weighting)(
        node_advantages, torch.full_like(node_advantages, pass_rate), min_weight=lead.min_weight,
        max_weight=lead.max_weight, midpoint=lead.midpoint, steepness=lead.steepness)
    weighted[0] = 0.0
    return weighted


def _test_rewards(trajectories: Sequence[Trajectory]) -> torch.Tensor:
    return torch.tensor([t.scored.test_reward for t in trajectories], dtype=torch.float64)
