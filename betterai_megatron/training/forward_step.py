"""The forward step and loss that megatron-core's pipeline schedules call for every micro-batch.

Returns the per-token loss *sum* and the token count (``calculate_per_token_loss``), so that gradients and the
reported loss are the mean over every loss token of the global batch whatever the layout.
"""

from __future__ import annotations

from functools import partial

import torch


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """``output_tensor [b, s]`` per-token losses -> (loss sum, token count, reporting {"lm loss": [sum, count]})."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.stack([loss_sum.detach().double(), num_tokens.double()])
    return loss_sum, num_tokens, {"lm loss": report}


def gpt_forward_step(data_iterator, model):
    """One micro-batch through a GPTModel chunk. Non-first pipeline stages get their input from the schedule."""
    batch = next(data_iterator) if data_iterator is not None else None
    tokens = batch["tokens"] if batch is not None else None
    position_ids = batch["position_ids"] if batch is not None else None
    labels = batch["labels"] if batch is not None else None
    attention_mask = batch.get("attention_mask") if batch is not None else None
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    if device is not None and tokens is not None:
        tokens, position_ids, labels = (t.to(device, non_blocking=True) for t in (tokens, position_ids, labels))
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
    output = model(tokens, position_ids, attention_mask, labels=labels)
    loss_mask = batch["loss_mask"] if batch is not None else None
    if loss_mask is not None and device is not None:
        loss_mask = loss_mask.to(device)
    return output, partial(masked_token_loss, loss_mask)
