"""The whole config tree (:class:`Config`), loading from YAML + overrides, and the cross-field checks.

``load_config(path, overrides)`` is the only way entry points obtain a config: it reads strict YAML, applies the
``model.preset``, applies dotted overrides, types everything, and runs :func:`validate_static` once. Checks that
need the world size (divisibility of the layout) live in :func:`validate_layout`, which the launcher runs before
any model is built; both raise a single :class:`ConfigError` listing every problem with its keys and values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from betterai_megatron.config.data import DataConfig, check_data_config
from betterai_megatron.config.loader import ConfigError, apply_overrides, from_dict, read_yaml
from betterai_megatron.config.model import ModelConfig
from betterai_megatron.config.parallel import ParallelConfig
from betterai_megatron.config.run import LogConfig, RunConfig
from betterai_megatron.config.train import CheckpointConfig, TrainConfig
from betterai_megatron.eval.evaluate import EvalConfig
from betterai_megatron.inference.config import GenerationConfig
from betterai_megatron.pipeline.pipeline_config import PipelineConfig
from betterai_megatron.rewards.rewards_config import RewardsConfig
from betterai_megatron.rewards.sandbox_config import SandboxConfig
from betterai_megatron.rl.algo_config import GRPOLossConfig
from betterai_megatron.rl.rollout import RolloutConfig
from betterai_megatron.rl.star import StarConfig

_MIXERS = {"A": "softmax attention", "D": "DeltaNet", "L": "GLA", "G": "Gated DeltaNet"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    grpo: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    star: StarConfig = field(default_factory=StarConfig)


def _resolve_preset(raw: dict) -> dict:
    """Merge ``model.preset``'s fields under the explicitly given model fields."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return raw
    from betterai_megatron.model.presets import get_preset

    merged = copy.deepcopy(get_preset(model["preset"]))
    for key, value in model.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    raw = dict(raw)
    raw["model"] = merged
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or defaults when ``path`` is None), apply dotted overrides, type and check it."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides or []))
    raw = _resolve_preset(raw)
    config = from_dict(Config, raw)
    validate_static(config)
    return config


def _transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a CUDA-less build failing at import
        return False
    return True


def validate_static(config: Config) -> None:
    """Cross-field checks that need no world size. Raises one ConfigError listing every problem."""
    m, p, t = config.model, config.parallel, config.train
    problems: list[str] = []
    positive = {
        "parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.cp": p.cp, "parallel.ep": p.ep,
        "train.micro_batch_size": t.micro_batch_size, "train.global_batch_size": t.global_batch_size,
        "train.seq_length": t.seq_length, "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads, "log.interval": config.log.interval,
    }
    problems += [f"{k}={v} must be >= 1" for k, v in positive.items() if v < 1]
    if t.steps < 0:
        problems.append(f"train.steps={t.steps} must be >= 0")
    if t.min_lr > t.lr:  # megatron-core's OptimizerParamScheduler asserts this without saying which keys
        problems.append(f"train.min_lr={t.min_lr} is above train.lr={t.lr}")
    if m.num_attention_heads % p.tp:
        problems.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    if m.query_groups % p.tp:
        problems.append(f"model.num_query_groups={m.query_groups} is not divisible by parallel.tp={p.tp}")
    if m.num_attention_heads % m.query_groups:
        problems.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                        f"model.num_query_groups={m.query_groups}")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        problems.append(f"model.num_layers={m.num_layers} is not divisible by parallel.pp*parallel.vpp="
                        f"{p.pp}*{p.vpp or 1}")
    if p.vpp is not None and (p.vpp < 1 or (p.vpp > 1 and p.pp < 2)):
        problems.append(f"parallel.vpp={p.vpp} needs parallel.pp >= 2 (got parallel.pp={p.pp})")
    if m.is_moe:
        if m.moe.num_experts % p.ep:
            problems.append(f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.ep={p.ep}")
        if m.moe.router_topk > m.moe.num_experts:
            problems.append(f"model.moe.router_topk={m.moe.router_topk} exceeds model.moe.num_experts="
                            f"{m.moe.num_experts}")
        if p.tp > 1 and p.sequence_parallel is False:
            problems.append(f"parallel.sequence_parallel=false: megatron-core requires sequence parallelism for "
                            f"MoE with parallel.tp={p.tp}")
        if isinstance(m.moe.layer_freq, list) and len(m.moe.layer_freq) != m.num_layers:
            problems.append(f"model.moe.layer_freq has {len(m.moe.layer_freq)} entries, model.num_layers="
                            f"{m.num_layers}")
        if m.moe.expert_bias and m.moe.score_function != "sigmoid":
            problems.append("model.moe.expert_bias=true needs model.moe.score_function=sigmoid (DeepSeek-V3)")
    elif p.ep > 1:
        problems.append(f"parallel.ep={p.ep} needs an MoE model (model.moe.num_experts is null)")
    if p.sequence_parallel and p.tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if m.nope_layer_interval is not None and m.nope_layers is not None:
        problems.append("set at most one of model.nope_layer_interval and model.nope_layers")
    if m.nope_layers is not None and any(not 1 <= n <= m.num_layers for n in m.nope_layers):
        problems.append(f"model.nope_layers={m.nope_layers} must be layer numbers in 1..{m.num_layers}")
    if (m.nope_layer_interval is not None or m.nope_layers is not None) and m.position_embedding != "rope":
        problems.append("model.nope_layer_interval/nope_layers need model.position_embedding=rope")
    if m.layer_pattern is not None:
        bad = sorted(set(m.layer_pattern) - set(_MIXERS))
        if bad or not m.layer_pattern:
            problems.append(f"model.layer_pattern={m.layer_pattern!r}: letters must be from "
                            + ", ".join(f"{k} ({v})" for k, v in _MIXERS.items()))
    if m.layer_pattern and set(m.layer_pattern) - {"A"}:
        try:
            m.linear_attention.validate()
        except ValueError as exc:
            problems.append(str(exc))
        halo = m.linear_attention.conv_kernel_size - 1  # tokens a CP chunk's convolution takes from before it
        convolved = bool(set(m.layer_pattern) & {"D", "G"}) or (
            "L" in m.layer_pattern and m.linear_attention.gla_short_conv)
        if p.cp > 1 and convolved and t.seq_length // (2 * p.cp) < halo:
            problems.append(f"train.seq_length={t.seq_length} with parallel.cp={p.cp} gives CP chunks of "
                            f"{t.seq_length // (2 * p.cp)} tokens, fewer than model.linear_attention."
                            f"conv_kernel_size - 1 = {halo} (the short convolution's halo comes from one chunk)")
    if m.fp8 is not None:
        if not _transformer_engine_importable():
            problems.append(f"model.fp8={m.fp8}: FP8 needs Transformer Engine on a CUDA GPU, and "
                            "transformer_engine is not importable here (install the 'te' extra on a GPU machine)")
        elif m.transformer_impl == "local":
            problems.append("model.fp8 needs model.transformer_impl=transformer_engine or auto")
    if m.transformer_impl == "transformer_engine" and not _transformer_engine_importable():
        problems.append("model.transformer_impl=transformer_engine but transformer_engine is not importable")
    if p.cp > 1 and p.cp_attention == "te" and not _transformer_engine_importable():
        problems.append(f"parallel.cp={p.cp} with parallel.cp_attention=te needs Transformer Engine")
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        problems.append(f"train.seq_length={t.seq_length} must be divisible by 2*parallel.cp={2 * p.cp} "
                        "(load-balanced causal chunks)")
    if p.cp > 1 and not context_parallel_available(config):
        problems.append(f"parallel.cp={p.cp}: context parallelism is not available on this path "
                        "(needs betterai_megatron.model.ring_attention)")
    if t.global_batch_size % t.micro_batch_size:
        problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                        f"train.micro_batch_size={t.micro_batch_size}")
    if not problems:  # the per-tensor split checks assume the basic fields are sane
        from betterai_megatron.model.param_count import divisibility_problems

        problems += divisibility_problems(m, p)
    problems += check_data_config(config.data, require_prefixes=False)  # pretraining checks them itself
    for section in (config.sandbox, config.rewards, config.pipeline, config.eval, config.star):
        try:
            section.validate()
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def context_parallel_available(config: Config) -> bool:
    """Whether cp>1 can run on the configured attention path."""
    if config.parallel.cp_attention == "te":
        return _transformer_engine_importable()
    try:
        import betterai_megatron.model.ring_attention  # noqa: F401
    except ImportError:
        return False
    return True


def data_parallel_size(config: Config, world_size: int) -> int:
    p = config.parallel
    return world_size // (p.tp * p.pp * p.cp)


def validate_layout(config: Config, world_size: int) -> None:
    """Checks that need the world size, run before any model is built."""
    p, t = config.parallel, config.train
    problems: list[str] = []
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        problems.append(f"world size {world_size} is not divisible by parallel.tp*parallel.pp*parallel.cp="
                        f"{p.tp}*{p.pp}*{p.cp}={model_parallel}")
    else:
        dp = world_size // model_parallel
        etp = p.etp or p.tp
        expert_grid = etp * p.ep * p.pp
        if world_size % expert_grid:
            problems.append(f"world size {world_size} is not divisible by parallel.etp*parallel.ep*parallel.pp="
                            f"{etp}*{p.ep}*{p.pp} (expert parallelism is carved out of data*context parallel)")
        if t.global_batch_size % (t.micro_batch_size * dp):
            problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                            f"train.micro_batch_size*data_parallel={t.micro_batch_size}*{dp}")
        elif p.vpp and p.vpp > 1:
            microbatches = t.global_batch_size // (t.micro_batch_size * dp)
            if microbatches % p.pp:
                problems.append(f"interleaved pipeline (parallel.vpp={p.vpp}) needs the number of micro-batches "
                                f"({microbatches}) to be a multiple of parallel.pp={p.pp}")
    if problems:
        raise ConfigError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
