"""Worker for test_inference_fork.py, run as ``torchrun --nproc-per-node 2 fork_tp2_worker.py OUT_DIR``.

At tp=2 (each rank caches its local heads), generation with prompt-prefix sharing (forked cache rows) and the
uncached reference, greedy and sampled, on a softmax and a hybrid tiny model. Each rank writes ``rank{r}.json``:
``{"<pattern>/<sampling>/<shared|uncached>": [{"tokens", "log_probs", "prompt_tokens_computed"}, ...]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from betterai_megatron.platform.cpu import enable_cpu_execution

PREFIX = "def add(a, b):\n"
PROMPTS = [PREFIX + "  ret", PREFIX + "  ret", PREFIX + "  x", PREFIX, "zz"]
SAMPLINGS = {"greedy": {"temperature": 0.0, "max_new_tokens": 8, "stop_at_eod": False},
             "sampled": {"temperature": 1.0, "max_new_tokens": 8, "seed": 11}}
PATTERNS = ("AA", "GA")


def main(out_dir: str) -> None:
    enable_cpu_execution()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from betterai_megatron.inference.config import GenerationConfig, SamplingParams
    from betterai_megatron.inference.engine import GenerationEngine
    from betterai_megatron.inference.testing import CharTokenizer, tiny_gpt_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tokenizer = CharTokenizer()
    prompts = [tokenizer.tokenize(p) for p in PROMPTS]
    results: dict[str, list[dict]] = {}
    for pattern in PATTERNS:
        model = tiny_gpt_model(layer_pattern=pattern)
        for name, params in SAMPLINGS.items():
            for mode, config in (("shared", GenerationConfig()), ("uncached", GenerationConfig(use_kv_cache=False))):
                out = GenerationEngine(model, tokenizer=tokenizer, config=config).generate(prompts, SamplingParams(**params))
                results[f"{pattern}/{name}/{mode}"] = [
                    {"tokens": r.tokens, "log_probs": r.log_probs, "prompt_tokens_computed": r.prompt_tokens_computed}
                    for r in out]
    parallel_state.destroy_model_parallel()
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
