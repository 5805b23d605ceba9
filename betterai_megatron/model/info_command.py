"""``betterai model-info --config FILE [--world-size N] [--json] [section.key=value ...]``.

Prints, without building the model (no torch, no megatron-core): total and active parameters, model FLOPs, the
parallel layout with its data-parallel size, and per pipeline stage the parameters on one rank and its memory
(weights, gradients, optimizer state, activations) in GiB. ``--json`` prints the same as one JSON object (bytes).
The world size defaults to the smallest the layout fits (:func:`.memory_estimate.smallest_world_size`); the
layout is checked with :func:`betterai_megatron.config.validate_layout`, and config errors exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from betterai_megatron.config import Config, ConfigError, load_config, validate_layout
from betterai_megatron.model.flops import flops_per_step, flops_per_token
from betterai_megatron.model.memory_estimate import (
    StageMemory,
    default_attention_kernel,
    estimate_memory,
    layout_sizes,
    optimizer_bytes_per_param,
    smallest_world_size,
)
from betterai_megatron.model.param_count import ParameterCounts, count_parameters, divisibility_problems

GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of GPUs (default: the smallest the layout fits)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 model.num_layers=4")


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
        world_size = args.world_size if args.world_size is not None else smallest_world_size(config.parallel)
        if world_size < 1:
            raise ConfigError(f"--world-size={world_size} must be >= 1")
        validate_layout(config, world_size)
        problems = divisibility_problems(config.model, config.parallel)
        if problems:
            raise ConfigError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
        report = build_report(config, world_size=world_size)
    except ConfigError as exc:
        print(f"betterai model-info: {exc}", file=sys.stderr)
        return 2
    report["config"] = str(args.config)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def build_report(config: Config, *, world_size: int) -> dict:
    """Everything model-info prints, as plain data (byte counts, element counts)."""
    m, p, t = config.model, config.parallel, config.train
    sizes = layout_sizes(model=m, parallel=p, train=t, world_size=world_size)
    counts: ParameterCounts = count_parameters(m, seq_length=t.seq_length, tp=p.tp)
    kernel = default_attention_kernel(model=m, parallel=p)
    stages: list[StageMemory] = estimate_memory(model=m, parallel=p, train=t, world_size=world_size,
                                                attention_kernel=kernel)
    return {
        "model": _model_summary(config),
        "layout": {
            "world_size": world_size, "tp": sizes.tp, "pp": sizes.pp, "vpp": sizes.vpp, "cp": sizes.cp,
            "ep": sizes.ep, "etp": sizes.etp, "dp": sizes.dp, "expert_dp": sizes.expert_dp,
            "sequence_parallel": sizes.sequence_parallel, "distributed_optimizer": p.distributed_optimizer,
            "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
            "num_micro_batches": sizes.num_micro_batches, "seq_length": t.seq_length,
        },
        "parameters": {
            "total": counts.total, "active": counts.active, "embedding": counts.embedding,
            "output_layer": counts.output_layer, "non_embedding": counts.non_embedding,
            "routed_experts": counts.routed_experts,
        },
        "flops": {
            "per_token": flops_per_token(m, seq_length=t.seq_length),
            "per_step": flops_per_step(model=m, seq_length=t.seq_length, global_batch_size=t.global_batch_size),
        },
        "stages": [_stage_record(s) for s in stages],
        "peak_bytes_per_gpu": max(s.total_bytes for s in stages),
        "assumptions": {
            "weights_bytes_per_param": {"fp32": 4, "bf16": 2, "fp16": 2}[m.params_dtype],
            "grads_bytes_per_param": 4,
            "optimizer_bytes_per_param": optimizer_bytes_per_param(model=m, optimizer=t.optimizer),
            "optimizer": t.optimizer,
            "attention_kernel": kernel,
            "recompute": m.recompute,
        },
    }


def _stage_record(stage: StageMemory) -> dict:
    s = stage.params
    return {
        "pp_rank": s.pp_rank, "layers": list(s.layers), "has_embedding": s.has_embedding,
        "has_output_layer": s.has_output_layer, "params": s.total, "dense_params": s.dense,
        "expert_params": s.expert, "weights_bytes": stage.weights_bytes, "grads_bytes": stage.grads_bytes,
        "optimizer_bytes": stage.optimizer_bytes, "activations_bytes": stage.activations_bytes,
        "total_bytes": stage.total_bytes, "in_flight_micro_batches": stage.in_flight,
    }


def _model_summary(config: Config) -> dict:
    m = config.model
    summary = {
        "preset": m.preset, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.resolved_ffn_hidden_size, "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.query_groups, "head_dim": m.head_dim, "vocab_size": m.vocab_size,
        "padded_vocab_size": m.padded_vocab_size(config.parallel.tp), "activation": m.activation,
        "normalization": m.normalization, "position_embedding": m.position_embedding,
        "tie_embeddings": m.tie_embeddings, "params_dtype": m.params_dtype, "layer_pattern": m.layer_pattern,
    }
    if m.is_moe:
        summary["moe"] = {"num_experts": m.moe.num_experts, "router_topk": m.moe.router_topk,
                          "ffn_hidden_size": m.moe.ffn_hidden_size or m.resolved_ffn_hidden_size,
                          "shared_expert_ffn_hidden_size": m.moe.shared_expert_ffn_hidden_size,
                          "moe_layers": sum(m.is_moe_layer(n) for n in range(1, m.num_layers + 1))}
    return summary


# ------------------------------------------------------------------------------------------- text output
def _count(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{suffix})"
    return f"{n:,}"


def _flops(n: float) -> str:
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {suffix}FLOP"
    return f"{n:.3g} FLOP"


def _gib(n: int) -> str:
    return f"{n / GIB:.4g}"


def _layer_ranges(layers: list[int]) -> str:
    ranges, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            ranges.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ",".join(ranges) or "-"


def _model_lines(model: dict) -> list[str]:
    heads = f"{model['num_attention_heads']} heads"
    if model["num_query_groups"] != model["num_attention_heads"]:
        heads += f" / {model['num_query_groups']} query groups"
    lines = [
        f"model       {model['preset'] or 'custom'}: {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"{heads} (head dim {model['head_dim']}), ffn {model['ffn_hidden_size']} {model['activation']}, "
        f"{model['normalization']}, {model['position_embedding']}, vocab {model['vocab_size']} "
        f"(padded {model['padded_vocab_size']}), {'tied' if model['tie_embeddings'] else 'untied'} embeddings, "
        f"{model['params_dtype']}",
    ]
    if model.get("moe"):
        moe = model["moe"]
        lines.append(f"            MoE in {moe['moe_layers']} layers: {moe['num_experts']} experts, "
                     f"top-{moe['router_topk']}, expert ffn {moe['ffn_hidden_size']}, "
                     f"shared expert ffn {moe['shared_expert_ffn_hidden_size'] or '-'}")
    if model["layer_pattern"]:
        lines.append(f"            layer pattern {model['layer_pattern']} (A attention, D DeltaNet, L GLA, "
                     "G Gated DeltaNet)")
    return lines


def format_report(report: dict) -> str:
    """The human-readable tables."""
    lay, par, flops = report["layout"], report["parameters"], report["flops"]
    lines = [f"betterai model-info: {report.get('config', '')}"] + _model_lines(report["model"])
    lines += [
        f"layout      world {lay['world_size']} = tp {lay['tp']} x pp {lay['pp']} x cp {lay['cp']} x dp {lay['dp']}; "
        f"vpp {lay['vpp']}, ep {lay['ep']}, etp {lay['etp']}, expert dp {lay['expert_dp']}; sequence parallel "
        f"{'on' if lay['sequence_parallel'] else 'off'}; distributed optimizer "
        f"{'on' if lay['distributed_optimizer'] else 'off'}",
        f"batch       {lay['num_micro_batches']} micro-batches of {lay['micro_batch_size']} x dp {lay['dp']} = "
        f"global batch {lay['global_batch_size']} sequences of {lay['seq_length']} tokens",
        f"parameters  total {_count(par['total'])}, active {_count(par['active'])}",
        f"            embedding {_count(par['embedding'])}, output layer "
        f"{_count(par['output_layer']) if par['output_layer'] else 'tied'}, routed experts "
        f"{_count(par['routed_experts'])}",
        f"FLOPs       {_flops(flops['per_token'])} per token, {_flops(flops['per_step'])} per step "
        "(model FLOPs, forward + backward)",
        "",
        "memory per GPU (GiB)",
    ]
    header = ("stage", "layers", "params", "weights", "grads", "optimizer", "activations", "total", "in flight")
    rows = [header]
    for s in report["stages"]:
        where = "+emb" if s["has_embedding"] else ""
        where += "+out" if s["has_output_layer"] else ""
        rows.append((f"pp {s['pp_rank']}{where}", _layer_ranges(s["layers"]), f"{s['params']:,}",
                     _gib(s["weights_bytes"]), _gib(s["grads_bytes"]), _gib(s["optimizer_bytes"]),
                     _gib(s["activations_bytes"]), _gib(s["total_bytes"]), str(s["in_flight_micro_batches"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    a = report["assumptions"]
    lines += [
        f"peak        {_gib(report['peak_bytes_per_gpu'])} GiB per GPU",
        f"assumes     weights {a['weights_bytes_per_param']} B/param, fp32 grads {a['grads_bytes_per_param']} B/param, "
        f"{a['optimizer']} state {a['optimizer_bytes_per_param']} B/param (sharded over dp with the distributed "
        f"optimizer); activations: {a['attention_kernel']} attention, recompute {a['recompute']}, balanced MoE "
        "routing; no allocator / communication buffers (expect 10-20% more)",
    ]
    return "\n".join(lines)
