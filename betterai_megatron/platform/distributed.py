"""Process-group start-up for every launcher: plain ``python``, ``torchrun`` (one or many nodes), Slurm ``srun``.

Reads the rank/world from the environment the launcher sets (torchrun: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
srun without torchrun: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``), defaults to a single process, picks
NCCL on CUDA and gloo otherwise, and installs the CPU bridge when there is no GPU.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from betterai_megatron.platform.cpu import enable_cpu_execution


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(*, backend: str = "auto", timeout_minutes: float = 10.0) -> ProcessInfo:
    """Initialise ``torch.distributed`` once (idempotent) and return this process's place in the world."""
    if not torch.cuda.is_available():
        enable_cpu_execution()
    if dist.is_initialized():
        return ProcessInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                           dist.get_backend())
    rank, world_size, local_rank = _launcher_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    init_method = None
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process launch; use torchrun or set it")
        # A single process gets a private port without writing it into os.environ, where child processes
        # (tests, pipeline stages) would inherit a port this process is still listening on.
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, init_method=init_method,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return ProcessInfo(rank, world_size, local_rank, backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
