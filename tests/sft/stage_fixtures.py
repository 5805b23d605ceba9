"""What the end-to-end stage tests (tests/sft, tests/eval) start from: built-in data, a tokenizer, indexed data and
a briefly pretrained tiny checkpoint — made the way a user makes them, with no download.

:func:`build_corpus` writes the built-in SFT conversations and tokenizer through the SFT stage's own
``ensure_builtin_sft_data`` (what ``examples/configs/tiny_sft.yaml`` relies on) and preprocesses the built-in
pretraining text to ``.bin/.idx``; :func:`pretrain` runs ``betterai pretrain`` on it under torchrun;
:func:`run_reference` runs ``reference_worker.py`` in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TINY_CONFIG, run_betterai

SFT_CONFIG = REPO / "examples" / "configs" / "tiny_sft.yaml"
WORKER = Path(__file__).with_name("reference_worker.py")
PRETRAIN_STEPS = 3


def build_corpus(root: Path) -> dict:
    """Built-in SFT data + tokenizer (512 pieces, the tiny preset's vocabulary) + indexed pretraining data."""
    from betterai_megatron.config import load_config
    from betterai_megatron.data.preprocess import PreprocessConfig, run_preprocess
    from betterai_megatron.pipeline.demo_data import DemoDataConfig
    from betterai_megatron.training.sft import ensure_builtin_sft_data

    paths = {"sft": root / "data" / "sft.jsonl", "tokenizer": root / "data" / "code.model",
             "prefix": root / "indexed" / "corpus"}
    config = load_config(SFT_CONFIG, [f"data.sft.paths=[{paths['sft']}]", f"data.tokenizer_model={paths['tokenizer']}"])
    # smaller than the default demo data (a slice of the stdlib instead of 2 MB): the tests need seconds, not text
    written = ensure_builtin_sft_data(config, demo=DemoDataConfig(levels=[1, 2], stdlib_max_files=12,
                                                                  stdlib_max_bytes=150_000))
    assert written == [paths["sft"], paths["tokenizer"]]
    paths["pretrain_text"] = root / "data" / "sft_builtin" / "pretrain.jsonl"
    paths["prefix"].parent.mkdir(parents=True)
    with open(os.devnull, "w") as quiet:
        run_preprocess(PreprocessConfig(output_prefix=str(paths["prefix"]), inputs=[str(paths["pretrain_text"])],
                                        tokenizer_model=str(paths["tokenizer"]), append_eod=True, workers=1),
                       stream=quiet)
    paths["indexed"] = Path(f"{paths['prefix']}_text_document")
    return paths


def data_overrides(paths: dict) -> list[str]:
    return ["data.mock=false", f"data.prefixes=[{paths['indexed']}]", f"data.tokenizer_model={paths['tokenizer']}",
            "data.tokenizer_type=SentencePieceTokenizer", "data.split=90,10,0"]


def pretrain(paths: dict, run_dir: Path) -> Path:
    """``betterai pretrain`` of the tiny preset on the indexed data; returns its checkpoint directory."""
    run_betterai(["pretrain", "--config", str(TINY_CONFIG), *data_overrides(paths), f"train.steps={PRETRAIN_STEPS}",
                  f"run.dir={run_dir}", "log.tensorboard=false", "log.level=WARNING"], timeout=300)
    return run_dir / "checkpoints"


def run_reference(tmp: Path, request: dict) -> dict:
    """Run reference_worker.py on ``request``; returns its JSON answer."""
    request_path, out_path = tmp / "reference_request.json", tmp / "reference_out.json"
    request_path.write_text(json.dumps(request))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(WORKER), str(request_path), str(out_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(out_path.read_text())


def tracker(checkpoint_dir: Path) -> int | None:
    path = Path(checkpoint_dir) / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() else None
