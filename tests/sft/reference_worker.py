"""Independent reference numbers for the stage tests, from a checkpoint, in one plain single process.

``python tests/sft/reference_worker.py REQUEST.json OUT.json``; the request names a config file, overrides, a
checkpoint directory and the quantities wanted:

* ``sft_loss``: the masked mean cross-entropy of the first global batch of the SFT training split under the
  checkpoint's weights and under the fresh initialisation (what the SFT stage would start from without them);
* ``perplexity``: the mean cross-entropy over the first N samples of the validation split of ``data.prefixes``;
* ``greedy``: greedy continuations of prompts, decoded naively (the whole sequence re-run for every token).

Losses are computed from the logits with ``torch.nn.functional.cross_entropy`` (the stages use megatron-core's
vocab-parallel cross-entropy inside the model) and reduced here by hand, so they check the stages' loss, masking,
reduction and checkpoint loading rather than repeat them.
"""

from __future__ import annotations

import json
import sys


def masked_mean_loss(model, samples: list[dict]) -> tuple[float, int]:
    """sum(CE * loss_mask) / sum(loss_mask) over ``samples`` (dataset items), one forward per sample."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0.0
    for sample in samples:
        tokens = torch.as_tensor(sample["tokens"]).long()[None]
        positions = torch.as_tensor(sample["position_ids"]).long()[None]
        mask = sample.get("attention_mask")
        mask = None if mask is None else torch.as_tensor(mask)[None]
        logits = model(tokens, positions, mask).float()  # [1, s, V]
        losses = F.cross_entropy(logits[0], torch.as_tensor(sample["labels"]).long(), reduction="none")
        weights = torch.as_tensor(sample["loss_mask"]).double()
        total += float((losses.double() * weights).sum())
        count += float(weights.sum())
    return total / count, int(count)


def naive_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities, recomputing the whole sequence at every step."""
    import torch

    sequence, tokens, log_probs = list(prompt), [], []
    for _ in range(steps):
        ids = torch.tensor([sequence])
        positions = torch.arange(len(sequence))[None]
        logits = model(ids, positions, None)[0, -1].float()
        token = int(torch.argmax(logits))
        tokens.append(token)
        log_probs.append(float(torch.log_softmax(logits.double(), dim=-1)[token]))
        sequence.append(token)
    return tokens, log_probs


def main(request_path: str, out_path: str) -> None:
    from betterai_megatron.config import load_config
    from betterai_megatron.data.tokenizer import build_tokenizer
    from betterai_megatron.inference.model_loading import load_model_for_inference

    with open(request_path) as handle:
        request = json.load(handle)
    config = load_config(request["config"], request["overrides"])
    tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
    model = load_model_for_inference(config, request["checkpoint"])
    out: dict = {}
    if "sft_loss" in request:
        from betterai_megatron.data.sft_dataset import build_sft_datasets

        config.data.sft.create_attention_mask = True  # the SFT stage's setting at cp=1
        train, _ = build_sft_datasets(config=config.data.sft, tokenizer=tokenizer,
                                      seq_length=config.train.seq_length, seed=config.train.seed)
        batch = [train[i] for i in range(config.train.global_batch_size)]
        out["sft_loss"], out["sft_tokens"] = masked_mean_loss(model, batch)
        out["sft_loss_fresh"], _ = masked_mean_loss(_fresh_model(config), batch)
    if "perplexity_samples" in request:
        from betterai_megatron.data.pretrain_datasets import build_pretrain_datasets

        n = request["perplexity_samples"]
        _, valid, _ = build_pretrain_datasets(data_config=config.data, tokenizer=tokenizer,
                                              seq_length=config.train.seq_length, seed=config.train.seed,
                                              train_samples=1, valid_samples=n, test_samples=0)
        out["perplexity_loss"], out["perplexity_tokens"] = masked_mean_loss(model, [valid[i] for i in range(n)])
    if "greedy_prompts" in request:
        out["greedy"] = [naive_greedy(model, tokenizer.tokenize(text), request["greedy_steps"])
                         for text in request["greedy_prompts"]]
    with open(out_path, "w") as handle:
        json.dump(out, handle)


def _fresh_model(config):
    from betterai_megatron.model.builder import build_model_chunks

    chunks, _ = build_model_chunks(model=config.model, parallel=config.parallel, seq_length=config.train.seq_length,
                                   seed=config.train.seed)
    return chunks[0].eval()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
