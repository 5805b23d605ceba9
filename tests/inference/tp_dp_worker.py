"""Worker for test_inference_distributed.py, run as ``torchrun --nproc-per-node 2 tp_dp_worker.py OUT_DIR``.

Phase 1, tp=2: cached and uncached greedy generation, and cached sampled generation, on the softmax and the
hybrid tiny model. Phase 2, tp=1 and dp=2: ``generate_data_parallel`` (sampled) over the same prompts.
Each rank writes ``rank{r}.json``: ``{"tp2/<pattern>/<sampling>/<cached|uncached>": [result, ...], ...}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from betterai_megatron.platform.cpu import enable_cpu_execution

PROMPTS = ["def add(a, b):", "import os\n", "x", "class Stack:", "# squares\n"]
SAMPLINGS = {
    "greedy": {"temperature": 0.0, "max_new_tokens": 12, "stop_at_eod": False},
    "sampled": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "seed": 21, "stop_strings": ["e"]},
}
PATTERNS = ("AA", "GADL")


def main(out_dir: str) -> None:
    enable_cpu_execution()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from betterai_megatron.inference.config import GenerationConfig, SamplingParams
    from betterai_megatron.inference.data_parallel import generate_data_parallel
    from betterai_megatron.inference.engine import GenerationEngine
    from betterai_megatron.inference.testing import CharTokenizer, tiny_gpt_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tokenizer = CharTokenizer()
    prompts = [tokenizer.tokenize(p) for p in PROMPTS]
    results: dict[str, list[dict]] = {}

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    for pattern in PATTERNS:
        model = tiny_gpt_model(layer_pattern=pattern)
        for name, params in SAMPLINGS.items():
            for cached in (True, False) if name == "greedy" else (True,):
                engine = GenerationEngine(model, tokenizer=tokenizer, config=GenerationConfig(use_kv_cache=cached))
                out = engine.generate(prompts, SamplingParams(**params))
                results[f"tp2/{pattern}/{name}/{'cached' if cached else 'uncached'}"] = [r.to_json() for r in out]
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    dp_group = parallel_state.get_data_parallel_group()
    assert dist.get_world_size(dp_group) == 2
    for pattern in PATTERNS:
        model = tiny_gpt_model(layer_pattern=pattern)
        engine = GenerationEngine(model, tokenizer=tokenizer)
        out = generate_data_parallel(engine, prompts, SamplingParams(**SAMPLINGS["sampled"]), dp_group=dp_group)
        results[f"dp2/{pattern}/sampled"] = [r.to_json() for r in out]
    parallel_state.destroy_model_parallel()

    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
