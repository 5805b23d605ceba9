"""Name -> function registries for reward shaping, so that each choice is a string in the ``rewards`` config.

The mechanism is the RL package's :class:`~betterai_megatron.rl.registry.Registry` (unknown names fail with the
closest valid one); this module re-exports it so reward modules do not reach into ``rl`` directly, and lists the
registries the ``rewards`` config resolves:

``TEST_REWARDS``            ``binary``, ``fraction``                          (:mod:`.test_reward`)
``ADVANTAGE_WEIGHTINGS``    ``none``, ``grpo_lead``                           (:mod:`.difficulty_weighting`)
``GROUP_FILTERS``           ``none``, ``dapo``                                (:mod:`.dynamic_sampling`)
``CURRICULUM_WEIGHTS``      ``uniform``, ``learnability``, ``target``         (:mod:`.curriculum`)
``LENGTH_PENALTIES``        ``none``, ``dapo_overlong``                       (:mod:`.overlong_penalty`)
"""

from __future__ import annotations

from betterai_megatron.rl.registry import Registry

__all__ = ["Registry"]
