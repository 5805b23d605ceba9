"""The per-batch inference state: megatron-core's static KV cache plus linear-attention recurrent states.

:class:`GenerationContext` *is* megatron-core's ``StaticInferenceContext`` (so megatron's attention allocates and
fills the KV cache exactly as in megatron's own static engine) with one addition: :meth:`keep_rows` / :meth:`fork_rows`,
which remove finished rows from every cached state (later steps compute only for live rows) and copy a row's
cached prefix into several rows (continuations of a shared prefix).

What lives in ``key_value_memory_dict[layer_number]``:

* softmax-attention layers (megatron ``Attention``): ``(key_memory, value_memory)``, each
  ``[max_sequence_length, max_batch_size, num_query_groups / tp, head_dim]``, allocated by megatron on the first
  forward; a forward of ``s`` tokens writes positions ``[sequence_len_offset, sequence_len_offset + s)`` of rows
  ``[0, b)`` and attends over positions ``[0, sequence_len_offset + s)``.
* every other layer that keeps state (the linear-attention mixers of ``betterai_megatron.model.linear_attention``):
  a tuple such as ``(conv_state [W - 1, b, channels], recurrent_state [heads, b, key_dim, value_dim])`` whose
  tensors hold the batch in **dim 1**, as megatron's KV cache does, sized to the rows of the current batch. The
  contract for such a mixer: when given ``inference_context``, start from zero state when
  ``inference_context.sequence_len_offset == 0`` (the prefill of a new batch); otherwise read its tuple from
  ``key_value_memory_dict[self.layer_number]`` *at every call* (rows may have been dropped between calls, so the
  batch size must not be cached), advance it over the ``s`` new tokens and store it back.

Rows are dropped or forked (:meth:`GenerationContext.fork_rows`: new row ``i`` = old row ``source[i]``, repeats
allowed) by gathering the source rows to the front: for KV memories only the filled positions are moved
(``[0, sequence_len_offset)``) within the preallocated memory; recurrent states are replaced by their gathered
rows. The engine forks a row when rows that shared every token so far are fed different tokens (prompts with a
common prefix, several samples of one prompt): the shared prefix is computed once.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext


class GenerationContext(StaticInferenceContext):
    """``StaticInferenceContext`` that knows which cached entries are KV memories, and can drop and fork rows.

    ``kv_layer_numbers``: layer numbers of megatron softmax-attention layers (the KV-cache layout above); every
    other entry is treated as recurrent state with the batch in dim 1.
    """

    def __init__(self, *, max_batch_size: int, max_sequence_length: int, kv_layer_numbers: frozenset[int]):
        super().__init__(max_batch_size, max_sequence_length)
        self.kv_layer_numbers = frozenset(kv_layer_numbers)
        self.batch_size = max_batch_size

    def keep_rows(self, keep_indices: torch.Tensor) -> None:
        """Keep only rows ``keep_indices`` (``[n]`` int64, increasing) of the current batch, in that order."""
        self.fork_rows(keep_indices)

    def fork_rows(self, source_rows: torch.Tensor) -> None:
        """Make row ``i`` of the new batch a copy of row ``source_rows[i]`` of the current batch.

        ``source_rows``: ``[n]`` int64, any order, repeats allowed (``n <= max_batch_size``). A repeated row is
        a fork: its copies hold the same cached prefix (KV positions ``[0, sequence_len_offset)`` and recurrent
        states) and can then be fed different tokens -- several continuations of one shared prefix without
        recomputing it. Omitted rows are dropped. Row-wise, so the same under any tensor-parallel layout (each
        rank forks its local heads).
        """
        source_rows = torch.as_tensor(source_rows, dtype=torch.long)
        new_batch_size = int(source_rows.numel())
        if new_batch_size > self.max_batch_size:
            raise ValueError(f"fork_rows: {new_batch_size} rows exceed the context's max_batch_size={self.max_batch_size}")
        if new_batch_size and (int(source_rows.min()) < 0 or int(source_rows.max()) >= self.batch_size):
            raise ValueError(f"fork_rows: source rows {source_rows.tolist()} outside the current batch [0, {self.batch_size})")
        filled = self.sequence_len_offset
        for layer_number, entry in list(self.key_value_memory_dict.items()):
            if layer_number in self.kv_layer_numbers:
                for memory in entry:
                    index = source_rows.to(memory.device)
                    # The right-hand side is a copy, so overlapping source and destination rows are safe.
                    memory[:filled, :new_batch_size] = memory[:filled].index_select(1, index)
            else:
                self.key_value_memory_dict[layer_number] = self._keep_recurrent_rows(layer_number, entry, source_rows)
        self.batch_size = new_batch_size

    def _keep_recurrent_rows(self, layer_number: int, entry, keep_indices: torch.Tensor):
        kept = []
        for tensor in entry:
            if not isinstance(tensor, torch.Tensor):
                kept.append(tensor)
                continue
            if tensor.dim() < 2 or tensor.size(1) != self.batch_size:
                raise RuntimeError(
                    f"inference state of layer {layer_number} has shape {tuple(tensor.shape)}, expected tensors "
                    f"with the batch in dim 1, of size {self.batch_size} (the rows of the current batch); see the "
                    f"contract in {__name__}"
                )
            kept.append(tensor.index_select(1, keep_indices.to(tensor.device)))
        return type(entry)(kept) if isinstance(entry, tuple) else kept


def softmax_attention_layer_numbers(model: torch.nn.Module) -> frozenset[int]:
    """Layer numbers of the megatron ``Attention`` modules in ``model`` (the layers whose state is a KV cache)."""
    from megatron.core.transformer.attention import Attention

    return frozenset(module.layer_number for module in model.modules() if isinstance(module, Attention))
