"""Fixtures for the generation tests: a one-process gloo world with megatron's model-parallel state (tp=1), and
tiny models built once per session: softmax-only ``AA`` and hybrid ``GADL`` (Gated DeltaNet, attention,
DeltaNet, GLA)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from betterai_megatron.platform.cpu import enable_cpu_execution


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world size 1) + megatron parallel_state with tp=pp=1, for the whole session."""
    enable_cpu_execution()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core box
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        # private rendezvous: never export MASTER_PORT, which child processes would inherit while in use
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    if created:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def softmax_model(megatron_world):
    from betterai_megatron.inference.testing import tiny_gpt_model

    return tiny_gpt_model(layer_pattern="AA")


@pytest.fixture(scope="session")
def hybrid_model(megatron_world):
    from betterai_megatron.inference.testing import tiny_gpt_model

    return tiny_gpt_model(layer_pattern="GADL")


@pytest.fixture(params=["softmax", "hybrid"])
def model(request, softmax_model, hybrid_model):
    return softmax_model if request.param == "softmax" else hybrid_model


@pytest.fixture(scope="session")
def tokenizer():
    from betterai_megatron.inference.testing import CharTokenizer

    return CharTokenizer()
