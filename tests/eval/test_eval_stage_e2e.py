"""``betterai eval`` and ``betterai generate`` end to end on a checkpoint of a briefly pretrained tiny model.

* eval: perplexity on the held-out split of the indexed data equals exp(mean loss) where the mean loss is
  computed independently (``tests/sft/reference_worker.py``: plain torch cross-entropy from the checkpoint);
  HumanEval pass@k with 3 problems x 2 samples, run through the sandbox, equals the unbiased estimator evaluated
  here on the per-sample verdicts of ``samples.jsonl``; ``results.json``, TensorBoard events and the printed
  table hold the same numbers.
* generate: greedy completions of a prompts file equal naive greedy decoding (whole sequence re-run for every
  token) from the same checkpoint, token for token, with matching log-probabilities.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import TINY_CONFIG, run_betterai
from tests.sft.stage_fixtures import (
    build_corpus,
    data_overrides,
    pretrain,
    run_reference,
)

# HumanEval prompts rendered in the chat format take up to ~450 tokens with the 512-piece tokenizer
EVAL_SEQ_LENGTH = 512
PERPLEXITY_SAMPLES = 4
NUM_SAMPLES, KS = 2, [1, 2]
PROMPTS = ["def add(a, b):\n", "import os\n\n\nclass Stack:"]
GREEDY_STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrained checkpoint, then ``betterai eval`` and ``betterai generate`` on it, then the references (one
    worker process for both, to keep the directory fast)."""
    root = tmp_path_factory.mktemp("eval_stage")
    paths = build_corpus(root)
    checkpoints = pretrain(paths, root / "pretrain")
    out = {"eval_dir": root / "eval", "output": root / "generate" / "o.jsonl"}
    eval_args = [*data_overrides(paths), f"checkpoint.load_dir={checkpoints}", f"run.dir={out['eval_dir']}",
                 f"train.seq_length={EVAL_SEQ_LENGTH}", f"eval.perplexity_samples={PERPLEXITY_SAMPLES}",
                 "eval.dataset=humaneval", "eval.max_problems=3", f"eval.num_samples={NUM_SAMPLES}", f"eval.k={KS}",
                 "eval.max_new_tokens=16", "log.level=WARNING", "generation.sampling.temperature=0",
                 f"generation.sampling.max_new_tokens={GREEDY_STEPS}", "generation.sampling.stop_at_eod=false"]
    out["eval_stdout"] = run_betterai(["eval", "--config", str(TINY_CONFIG), *eval_args], timeout=300).stdout
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n" for i, text in enumerate(PROMPTS)))
    out["generate_stdout"] = run_betterai(["generate", "--config", str(TINY_CONFIG), "--checkpoint", str(checkpoints),
                                           "--prompts", str(prompts), "--output", str(out["output"]), *eval_args],
                                          timeout=300).stdout
    out["reference"] = run_reference(root, {"config": str(TINY_CONFIG), "overrides": eval_args,
                                            "checkpoint": str(checkpoints), "perplexity_samples": PERPLEXITY_SAMPLES,
                                            "greedy_prompts": PROMPTS, "greedy_steps": GREEDY_STEPS})
    return out


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021 in its binomial form, 1 - C(n-c, k) / C(n, k) (the module uses the product form)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_eval_perplexity_and_humaneval_pass_at_k(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, reference = runs["eval_dir"], runs["reference"]
    results = json.loads((run_dir / "results.json").read_text())
    ppl = results["perplexity"]
    assert ppl["tokens"] == reference["perplexity_tokens"] == PERPLEXITY_SAMPLES * EVAL_SEQ_LENGTH
    assert ppl["loss"] == pytest.approx(reference["perplexity_loss"], rel=1e-5)
    assert ppl["perplexity"] == pytest.approx(math.exp(reference["perplexity_loss"]), rel=1e-5)

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    task_ids = [f"HumanEval/{i}" for i in range(3)]
    assert [s["task_id"] for s in samples] == [t for t in task_ids for _ in range(NUM_SAMPLES)]
    assert all(isinstance(s["passed"], bool) and s["result"] for s in samples)
    code = results["code"]
    assert (code["problems"], code["problems_too_long"], code["samples_per_problem"]) == (3, 0, NUM_SAMPLES)
    for k in KS:
        expected = sum(unbiased_pass_at_k(NUM_SAMPLES, sum(s["passed"] for s in samples if s["task_id"] == t), k)
                       for t in task_ids) / len(task_ids)
        assert code[f"pass@{k}"] == pytest.approx(expected)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert events.Scalars("eval/perplexity/perplexity")[0].value == pytest.approx(ppl["perplexity"], rel=1e-6)
    assert events.Scalars("eval/code/pass@1")[0].value == pytest.approx(code["pass@1"])
    stdout = runs["eval_stdout"]  # the printed table
    assert f"{'perplexity.perplexity':<25} | {ppl['perplexity']:.4f}" in stdout
    assert f"{'code.pass@2':<25} | {code['pass@2']:.4f}" in stdout


def test_generate_on_a_trained_checkpoint(runs):
    assert f"{len(PROMPTS)} completions" in runs["generate_stdout"]
    lines = [json.loads(line) for line in runs["output"].read_text().splitlines()]
    assert [line["id"] for line in lines] == ["p0", "p1"] and [line["prompt"] for line in lines] == PROMPTS
    for line, (tokens, log_probs) in zip(lines, runs["reference"]["greedy"], strict=True):
        assert line["tokens"] == tokens and line["finish_reason"] == "length"
        assert line["log_probs"] == pytest.approx(log_probs, abs=1e-5)
