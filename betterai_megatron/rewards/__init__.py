"""Verifiable rewards for code: the sandbox that runs untrusted programs, and the reward shaping around it.

Running code (the only place untrusted code runs; threat model in :mod:`.sandbox`):

``sandbox_config``     ``SandboxConfig`` (config section ``sandbox``).
``sandbox``            one program in bubblewrap: namespaces, seccomp (:mod:`.seccomp_filter`), rlimits, uid drop,
                       deadline and output cap (:mod:`.bounded_io`), stray-process sweep (:mod:`.process_sweep`).
``sandbox_server``     the child process that owns every sandboxed program; ``worker_pool.SandboxPool`` its handle.
``languages``          Python, JavaScript (Node.js) and C++ runners behind one interface; ``verdict`` the result.
``executor``           ``CodeExecutor``: problems + completions -> verdicts.

Rewards (pure functions, each selectable by name from the ``rewards`` config, :mod:`.rewards_config`):

``test_reward``        binary / fraction-passed test rewards.
``format_reward``      ``<think>...</think>`` + one fenced block; code extraction.
``difficulty``         a problem's difficulty from its label and its running pass rate.
``difficulty_weighting``  GRPO-LEAD's logistic advantage weight.
``dynamic_sampling``   DAPO's filter of all-pass / all-fail groups.
``curriculum``         pass-rate curriculum sampler.
``overlong_penalty``   DAPO's soft overlong penalty.
``rollout_scoring``    the glue the RL loop calls.

Nothing is imported here: the sandbox path needs only the standard library, the shaping functions need torch.
"""
