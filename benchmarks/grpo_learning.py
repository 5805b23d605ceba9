"""Evidence that GRPO learns: the demo configuration on CPU, several seeds, reward of the last fifth vs the first.

    .venv/bin/python -m benchmarks.grpo_learning --jobs 3                # 3 seeds, examples/configs/tiny_grpo.yaml
    .venv/bin/python -m benchmarks.grpo_learning --seeds 11 12 13 --steps 80 rollout.tree.depth=2

1. a starting policy that knows the answer format: ``benchmarks.grpo_warmup`` (SFT of the tiny preset on half of the
   level-1 generator tasks until the loss reaches 0.06; reused if ``<out>/warmup/warmup.json`` has the same
   settings). GRPO then trains on the *other half* (``--holdout-fraction``), tasks whose solutions the starting
   policy never saw, so a rising reward is not SFT memorisation being recalled;
2. for every seed, ``betterai grpo --config <config> train.seed=<seed> ...`` from that checkpoint (a fresh run
   directory ``<out>/seed_<seed>``; the seed drives sampling, the curriculum and the mini-batch order), ``--jobs``
   seeds at a time;
3. per seed, the mean ``reward_mean`` (and ``pass_rate``) of the first and of the last fifth of the steps, with
   Welch's t of the step values; the summary goes to ``<out>/summary.json``, the curves to
   ``<out>/grpo_reward_curve.png``. Exit status 1 unless every seed improves.

``reward_mean`` is over every trajectory sampled in a step (before dynamic sampling drops groups), so filtering
cannot flatter the curve; the problem distribution is stationary in the demo config (uniform curriculum).

Measured (2 shared cores, 3 seeds in parallel, ~20 min): reward 0.36 -> 0.62 and pass rate 0.27 -> 0.52 from the
first to the last fifth of 60 steps, every seed (Welch t 5.8 to 8.6).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "examples" / "configs" / "tiny_grpo.yaml"


def run_warmup(out: Path, *, steps: int, levels: str, seed: int, model: list[str], target_loss: float,
               holdout_fraction: float) -> dict:
    settings = {"steps": steps, "levels": [int(v) for v in levels.split(",")], "model_overrides": model,
                "seed": seed, "target_loss": target_loss, "holdout_fraction": holdout_fraction}
    summary_path = out / "warmup.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if all(summary.get(k) == v for k, v in settings.items()):
            print(f"reusing the warm-up in {out}", flush=True)
            return summary
        shutil.rmtree(out)
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.grpo_warmup", "--out", str(out), "--steps", str(steps),
               "--levels", levels, "--seed", str(seed), "--target-loss", str(target_loss), "--holdout-fraction",
               str(holdout_fraction), "--model", *model]
    subprocess.run(command, cwd=REPO, env=_env(), check=True)
    print(f"warm-up: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(summary_path.read_text())


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    return {**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def start_grpo(run_dir: Path, *, config: Path, seed: int, steps: int, warmup: dict, nproc: int,
               overrides: list[str]) -> subprocess.Popen:
    """Launch one GRPO run (its output goes to ``<run_dir>/log.txt``)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    args = ["grpo", "--config", str(config), f"run.dir={run_dir}", f"train.seed={seed}", f"train.steps={steps}",
            f"data.tokenizer_model={warmup['tokenizer_model']}", f"checkpoint.load_dir={warmup['checkpoint_dir']}",
            f"rollout.problems={warmup['grpo_problems']}", *warmup["model_overrides"],
            f"model.vocab_size={warmup['vocab_size']}", *overrides]
    if nproc == 1:
        command = [sys.executable, "-m", "betterai_megatron", *args]
    else:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                   "127.0.0.1", "--master-port", str(port), "-m", "betterai_megatron", *args]
    with open(run_dir / "log.txt", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def run_seeds(out: Path, *, seeds: list[int], jobs: int, **kwargs) -> dict[int, list[dict]]:
    """GRPO for every seed, ``jobs`` runs at a time; returns each run's ``metrics.jsonl`` records."""
    pending, running, curves = list(seeds), {}, {}
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            running[seed] = start_grpo(out / f"seed_{seed}", seed=seed, **kwargs)
        time.sleep(2)
        for seed, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[seed]
            if process.returncode != 0:
                raise RuntimeError(f"GRPO seed {seed} failed ({process.returncode}): see {out / f'seed_{seed}'}/log.txt")
            print(f"seed {seed}: done after {time.perf_counter() - start:.0f} s", flush=True)
            lines = (out / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
            curves[seed] = [json.loads(line) for line in lines if line.strip()]
    return {seed: curves[seed] for seed in seeds}


def fifths(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last fifth (at least one step each)."""
    size = max(1, len(values) // 5)
    return statistics.fmean(values[:size]), statistics.fmean(values[-size:])


def welch_t(values: list[float]) -> float:
    """Welch's t statistic of the last fifth's step values against the first fifth's (how clear the gain is)."""
    size = max(2, len(values) // 5)
    first, last = values[:size], values[-size:]
    spread = (statistics.variance(first) + statistics.variance(last)) / size
    return (statistics.fmean(last) - statistics.fmean(first)) / max(spread, 1e-12) ** 0.5


def summarize(curves: dict[int, list[dict]]) -> dict:
    seeds = {}
    for seed, records in curves.items():
        rewards = [r["reward_mean"] for r in records]
        passes = [r["pass_rate"] for r in records]
        first, last = fifths(rewards)
        pass_first, pass_last = fifths(passes)
        seeds[seed] = {"steps": len(records), "reward_first_fifth": first, "reward_last_fifth": last,
                       "reward_gain": last - first, "reward_gain_welch_t": welch_t(rewards),
                       "pass_rate_first_fifth": pass_first,
                       "pass_rate_last_fifth": pass_last,
                       "format_rate_last_fifth": fifths([r["format_rate"] for r in records])[1],
                       "seconds": sum(r["step_time_s"] for r in records)}
    gains = [s["reward_gain"] for s in seeds.values()]
    return {"seeds": seeds, "mean_reward_gain": statistics.fmean(gains),
            "std_reward_gain": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "all_seeds_improve": all(g > 0 for g in gains)}


def plot(curves: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed, records in curves.items():
        steps = [r["step"] for r in records]
        for axis, key in zip(axes, ("reward_mean", "pass_rate")):
            values = [r[key] for r in records]
            window = max(1, len(values) // 10)
            smooth = [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
            line = axis.plot(steps, values, alpha=0.25)[0]
            axis.plot(steps, smooth, color=line.get_color(), label=f"seed {seed}")
    for axis, title in zip(axes, ("mean reward per step (all samples)", "pass rate per step")):
        axis.set_xlabel("GRPO step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GRPO learning evidence on CPU (see the module docstring)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "grpo_learning")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps per seed")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun when > 1)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at the same time")
    parser.add_argument("--holdout-fraction", type=float, default=0.5,
                        help="tasks the warm-up SFT never sees; GRPO trains on them (0: on the SFT tasks)")
    parser.add_argument("--warmup-steps", type=int, default=800, help="cap of the warm-up SFT steps")
    parser.add_argument("--warmup-target-loss", type=float, default=0.06, help="warm-up stops at this loss")
    parser.add_argument("--warmup-levels", default="1")
    parser.add_argument("--warmup-seed", type=int, default=1234)
    parser.add_argument("--model", nargs="*", default=["model.preset=tiny"], help="model.* overrides (both stages)")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every GRPO run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    warmup = run_warmup(args.out / "warmup", steps=args.warmup_steps, levels=args.warmup_levels,
                        seed=args.warmup_seed, model=args.model, target_loss=args.warmup_target_loss,
                        holdout_fraction=args.holdout_fraction)
    curves = run_seeds(args.out, seeds=args.seeds, jobs=args.jobs, config=args.config, steps=args.steps,
                       warmup=warmup, nproc=args.nproc, overrides=args.overrides)
    summary = summarize(curves)
    summary.update(config=str(args.config), steps=args.steps, overrides=args.overrides,
                   warmup={k: warmup.get(k) for k in ("steps", "steps_done", "target_loss", "seed", "levels",
                                                      "model_overrides", "num_problems", "num_held_out",
                                                      "holdout_fraction", "grpo_problems")})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(curves, args.out / "grpo_reward_curve.png")
    w = summary["warmup"]
    print(f"\nstarting policy: {w['model_overrides']} after {w['steps_done']} SFT steps (loss target "
          f"{w['target_loss']}) on {w['num_problems']} level-{w['levels']} tasks; GRPO on "
          f"{w['num_held_out'] or w['num_problems']} tasks {'held out of' if w['num_held_out'] else 'seen in'} SFT")
    print(f"\n{'seed':>6} {'reward 1st 5th':>15} {'reward last 5th':>16} {'gain':>8} {'t':>6} {'pass 1st':>9} "
          f"{'pass last':>10} {'s':>6}")
    for seed, s in summary["seeds"].items():
        print(f"{seed:>6} {s['reward_first_fifth']:>15.3f} {s['reward_last_fifth']:>16.3f} {s['reward_gain']:>+8.3f} "
              f"{s['reward_gain_welch_t']:>6.1f} {s['pass_rate_first_fifth']:>9.3f} {s['pass_rate_last_fifth']:>10.3f} "
              f"{s['seconds']:>6.0f}")
    print(f"mean gain {summary['mean_reward_gain']:+.3f} (std {summary['std_reward_gain']:.3f}); every seed "
          f"improves: {summary['all_seeds_improve']}; curve: {args.out / 'grpo_reward_curve.png'}")
    return 0 if summary["all_seeds_improve"] else 1


if __name__ == "__main__":
    sys.exit(main())
