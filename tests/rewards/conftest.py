"""One sandbox pool for the reward tests (starting a server costs ~0.5 s; every test that can shares it)."""

from __future__ import annotations

import pytest
from rewards_host_checks import SHARED_CONFIG

from betterai_megatron.rewards.executor import CodeExecutor
from betterai_megatron.rewards.sandbox_config import SandboxConfig


@pytest.fixture(scope="session")
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(**SHARED_CONFIG)


@pytest.fixture(scope="session")
def executor(sandbox_config):
    with CodeExecutor(sandbox_config) as shared:
        assert shared.isolated, "bubblewrap must be installed for these tests (scripts/setup_system.sh)"
        yield shared
