"""STaR: which samples are kept, the rationalization prompt, the SFT jsonl (read back by the SFT reader), the config
checks, and one end-to-end iteration of ``betterai star`` on a fresh tiny model with a tokenizer trained here
(which passes nothing, so the iteration must skip SFT with a clear log line and still write its files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from betterai_megatron.data.problems import Problem
from betterai_megatron.data.problems.jsonl_io import write_problems_jsonl
from betterai_megatron.data.sft_dataset import SftDataConfig, load_conversations
from betterai_megatron.rl.star import (
    StarConfig,
    iteration_stats,
    rationalization_message,
    select_kept,
    unsolved_problems,
    write_jsonl,
)

ADD = Problem(task_id="t/add", prompt='def add(a, b):\n    """Return a plus b."""\n',
              tests="def check(candidate):\n    assert candidate(1, 2) == 3\n", entry_point="add",
              canonical_solution="    return a + b\n")
NEG = Problem(task_id="t/neg", prompt='def neg(x):\n    """Return minus x."""\n',
              tests="def check(candidate):\n    assert candidate(2) == -2\n", entry_point="neg",
              canonical_solution="    return -x\n")
NO_REF = Problem(task_id="t/noref", prompt="def f(x):\n", tests="def check(candidate):\n    pass\n",
                 entry_point="f")

USER_ADD = 'Complete this python function.\n```python\ndef add(a, b):\n    """Return a plus b."""\n```'
GOOD = "<think>add them</think>\n```python\ndef add(a, b):\n    return a + b\n```"
GOOD_CANONICAL = "<think>\nadd them\n</think>\n```python\ndef add(a, b):\n    return a + b\n```"
OTHER = "<think>\nuse sum\n</think>\n```python\ndef add(a, b):\n    return sum((a, b))\n```"
NO_THINK = "```python\ndef neg(x):\n    return -x\n```"


def rec(problem, completion, passed):
    return {"task_id": problem.task_id, "completion": completion, "passed": passed}


def test_keeps_passing_well_formed_distinct_answers_in_canonical_format():
    records = [rec(ADD, GOOD, True), rec(ADD, GOOD_CANONICAL, True), rec(ADD, OTHER, False),
               rec(NEG, NO_THINK, True), rec(NEG, "<think>x</think>\n```python\nbad\n```", False), rec(NEG, "", False)]
    kept = select_kept([ADD, NEG], records, samples_per_problem=3, source="sample")
    # GOOD and GOOD_CANONICAL are the same answer once normalised: one copy; OTHER failed; NO_THINK is malformed
    assert kept == [{"messages": [{"role": "user", "content": USER_ADD},
                                  {"role": "assistant", "content": GOOD_CANONICAL}],
                     "task_id": "t/add", "source": "sample"}]
    assert [r["kept"] for r in records] == [True, False, False, False, False, False]


def test_malformed_passing_answer_kept_raw_without_require_format_and_cap_per_problem():
    records = [rec(ADD, GOOD, True), rec(ADD, OTHER, True), rec(NEG, NO_THINK, True), rec(NEG, NO_THINK, True)]
    kept = select_kept([ADD, NEG], records, samples_per_problem=2, source="sample", require_format=False,
                       max_kept_per_problem=1)
    assert [(c["task_id"], c["messages"][1]["content"]) for c in kept] == [("t/add", GOOD_CANONICAL),
                                                                          ("t/neg", NO_THINK)]
    assert [r["kept"] for r in records] == [True, False, True, False]


def test_misaligned_records_are_an_error():
    with pytest.raises(ValueError, match="3 records for 2 problems x 2 samples"):
        select_kept([ADD, NEG], [rec(ADD, GOOD, True)] * 3, samples_per_problem=2, source="sample")
    with pytest.raises(ValueError, match="'t/neg' where 't/add' was expected"):
        select_kept([ADD], [rec(NEG, GOOD, True)], samples_per_problem=1, source="sample")


def test_unsolved_problems_are_those_with_no_pass_and_a_reference():
    records = [rec(ADD, "x", False), rec(ADD, "y", False), rec(NEG, "x", False), rec(NEG, "y", True),
               rec(NO_REF, "x", False), rec(NO_REF, "y", False)]
    assert unsolved_problems([ADD, NEG, NO_REF], records, samples_per_problem=2) == [ADD]


def test_rationalization_prompt_carries_the_reference_but_the_kept_turn_does_not():
    message = rationalization_message(ADD)
    assert message == (USER_ADD + "\n\nHint: this reference solution passes the tests:\n```python\n"
                       'def add(a, b):\n    """Return a plus b."""\n    return a + b\n```\n'
                       "Work out step by step why it solves the task, then give your own answer in the required format.")
    kept = select_kept([ADD], [rec(ADD, GOOD, True)], samples_per_problem=1, source="rationalization")
    assert kept[0]["messages"][0]["content"] == USER_ADD  # trained as if unaided (STaR sec. 3.2)
    assert kept[0]["source"] == "rationalization"
    with pytest.raises(ValueError, match="t/noref.*no canonical_solution"):
        rationalization_message(NO_REF)


def test_written_jsonl_reads_back_through_the_sft_reader(tmp_path):
    kept = select_kept([ADD], [rec(ADD, GOOD, True), rec(ADD, OTHER, True)], samples_per_problem=2, source="sample")
    path = write_jsonl(tmp_path / "kept.jsonl", kept)
    conversations = load_conversations([str(path)], config=SftDataConfig())
    assert [messages for _, messages in conversations] == [
        [{"role": "user", "content": USER_ADD}, {"role": "assistant", "content": GOOD_CANONICAL}],
        [{"role": "user", "content": USER_ADD}, {"role": "assistant", "content": OTHER}]]
    assert write_jsonl(tmp_path / "none.jsonl", []).read_text() == ""


def test_iteration_stats_hand_counted():
    records = [rec(ADD, GOOD, True), rec(ADD, "x", False), rec(NEG, "x", False), rec(NEG, "y", False)]
    kept = [{"source": "sample"}, {"source": "rationalization"}, {"source": "rationalization"}]
    assert iteration_stats([ADD, NEG], records, kept, samples_per_problem=2, rationalized=1) == {
        "problems": 2, "samples": 4, "pass_rate": 0.25, "problems_solved": 1, "rationalization_prompts": 1,
        "kept": 3, "kept_sampled": 1, "kept_rationalized": 2}


@pytest.mark.parametrize("change, key", [({"iterations": 0}, "star.iterations=0"),
                                         ({"samples_per_problem": 0}, "star.samples_per_problem=0"),
                                         ({"dataset": "mbpp"}, "star.dataset='mbpp'"),
                                         ({"sft_overrides": ["train.steps"]}, "star.sft_overrides")])
def test_config_errors_name_the_key(change, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        StarConfig(**change).validate()


def test_sft_subprocess_config_starts_weights_only_from_the_given_model_with_star_overrides_last():
    from betterai_megatron.config import load_config
    from betterai_megatron.rl.star_command import sft_command

    overrides = ["data.mock=true", "train.steps=99", "star.sft_overrides=[train.steps=7]"]
    config = load_config(None, overrides)
    command = sft_command(config, "cfg.yaml", overrides, start_dir="base/ckpt", iteration_dir=Path("run/iter_2"))
    assert command[command.index("-m", 3) + 1:][:3] == ["betterai_megatron", "sft", "--config"]
    child = load_config(None, command[command.index("cfg.yaml") + 1:])
    assert (child.data.sft.paths, child.checkpoint.load_dir, child.checkpoint.load_weights_only,
            child.checkpoint.dir, child.run.dir, child.train.steps) == (
        ["run/iter_2/kept.jsonl"], "base/ckpt", True, "run/iter_2/checkpoints", "run/iter_2/sft", 7)
    fresh = sft_command(config, "cfg.yaml", overrides, start_dir=None, iteration_dir=Path("run/iter_1"))
    assert not any(arg.startswith("checkpoint.load_dir=") for arg in fresh)


# ------------------------------------------------------------------------------------------------- end to end

def _tokenizer(directory: Path) -> str:
    from betterai_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

    from betterai_megatron.data.chat_template import REASONING_SYSTEM_PROMPT

    # the prompts themselves, so that they (system prompt and hint included) fit the tiny model's context
    texts = [REASONING_SYSTEM_PROMPT + rationalization_message(p) for p in (ADD, NEG)] * 20
    config = TokenizerTrainingConfig(vocab_size=400, user_defined_symbols=("<|im_start|>", "<|im_end|>", "<think>",
                                                                           "</think>"), num_threads=1)
    return train_tokenizer(texts, str(directory / "tok"), config=config)


def test_one_iteration_end_to_end_skips_sft_when_nothing_passes(tmp_path, capfd):
    problems = tmp_path / "problems.jsonl"
    write_problems_jsonl(problems, [ADD, NEG])
    config = tmp_path / "star.yaml"
    config.write_text(f"""
model: {{preset: tiny}}
train: {{seed: 7, micro_batch_size: 1, global_batch_size: 1, seq_length: 384}}
data: {{mock: true, tokenizer_type: SentencePieceTokenizer, tokenizer_model: {_tokenizer(tmp_path)}}}
run: {{dir: {tmp_path / 'run'}}}
log: {{tensorboard: false}}
star: {{iterations: 1, samples_per_problem: 2, problems_path: {problems}, rationalize: true, max_new_tokens: 6}}
""")
    command = [sys.executable, "-m", "betterai_megatron", "star", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "iteration 1: no sample passed the tests" in result.stdout and "SFT skipped" in result.stdout
    run = tmp_path / "run"
    stats = json.loads((run / "iter_1" / "stats.json").read_text())
    assert stats["samples"] == 4 and stats["problems"] == 2 and stats["kept"] == 0
    assert stats["rationalization_prompts"] == 2  # both unsolved, both have a reference
    samples = [json.loads(line) for line in (run / "iter_1" / "samples.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in samples] == ["sample"] * 4 + ["rationalization"] * 4
    assert (run / "iter_1" / "kept.jsonl").read_text() == ""
    assert not (run / "iter_1" / "checkpoints").exists()
    summary = json.loads((run / "star_summary.json").read_text())
    assert summary["final_model"] is None and summary["iterations"][0]["sft_skipped"] is True
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and metrics[0]["kept"] == 0
    # a re-run skips the complete iteration (in-process: the orchestrator itself starts no model)
    from betterai_megatron.config import load_config
    from betterai_megatron.rl.star_command import run_star

    history = run_star(load_config(config), str(config), [])
    assert "iteration 1: complete, skipped" in capfd.readouterr().out
    assert history == summary["iterations"]
