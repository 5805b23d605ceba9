"""The ``betterai`` command line: one sub-command per stage, each implemented in its own module.

Each entry of :data:`COMMANDS` names a module that defines ``add_arguments(parser)`` and ``main(args) -> int``.
Modules are imported only when their command runs, so ``betterai --help`` stays fast and a stage's heavy
imports (torch, megatron-core) are paid only by the stages that need them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("betterai_megatron.training.pretrain_command", "pretrain a megatron-core GPT model"),
    "sft": ("betterai_megatron.training.sft_command", "supervised fine-tuning on chat data"),
    "generate": ("betterai_megatron.inference.generate_command", "sample completions for a JSONL of prompts"),
    "eval": ("betterai_megatron.eval.eval_command", "perplexity and pass@k of a checkpoint"),
    "pipeline": ("betterai_megatron.pipeline.command", "tokenizer -> preprocess -> pretrain -> SFT -> GRPO -> eval"),
    "model-info": ("betterai_megatron.model.info_command", "parameter counts and memory per GPU for a config"),
    "eval-code": ("betterai_megatron.eval.code_eval_command", "pass@k of code samples, run in the sandbox"),
    "preprocess": ("betterai_megatron.data.preprocess.cli", "tokenize code corpora into Megatron .bin/.idx"),
    "train-tokenizer": ("betterai_megatron.data.tokenizer_training", "train a sentencepiece code tokenizer"),
    "grpo": ("betterai_megatron.rl.grpo_command", "GRPO on verifiable code rewards (sandboxed tests)"),
    "star": ("betterai_megatron.rl.star_command", "STaR: sample, keep passing solutions, fine-tune, repeat"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="betterai", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module_path, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        sub.set_defaults(_module=module_path)
        # Arguments are registered lazily in main() for the chosen command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"betterai {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
