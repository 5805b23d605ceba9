"""The fla-compatible surface of the linear-attention kernels: backend choice and its log line, fla's optional
arguments (in-kernel L2 norm, in-kernel gate/beta activations, V-first state layout, packed variable-length
sequences) checked against the independent recurrences of ``test_linear_attention_kernels``, and argument errors.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from betterai_megatron.kernels import _fla_compat, chunk_delta_rule, chunk_gated_delta_rule, chunk_gla
from test_linear_attention_kernels import (
    TOLERANCE,
    make_inputs,
    reference_delta_rule,
    reference_gla,
    relative_error,
)


def test_auto_uses_torch_on_cpu_and_logs_the_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(_fla_compat, "_LOGGED", set())
    monkeypatch.delenv(_fla_compat.BACKEND_ENV_VAR, raising=False)
    inputs = make_inputs("gla", length=5)
    with caplog.at_level(logging.INFO, logger=_fla_compat.__name__):
        for _ in range(3):
            chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    lines = [r.getMessage() for r in caplog.records if "chunk_gla" in r.getMessage()]
    assert lines == ["linear attention: chunk_gla uses the torch chunked/recurrent kernel (device cpu)"]


def test_asking_for_fla_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_fla_compat, "fla_ops", lambda: None)
    inputs = make_inputs("delta_rule", length=5)
    with pytest.raises(RuntimeError, match="flash-linear-attention is not importable"):
        chunk_delta_rule(inputs["q"].bfloat16(), inputs["k"].bfloat16(), inputs["v"].bfloat16(),
                         inputs["beta"].bfloat16(), backend="fla")


def test_backend_environment_variable_is_validated(monkeypatch):
    monkeypatch.setenv(_fla_compat.BACKEND_ENV_VAR, "triton")
    inputs = make_inputs("gla", length=5)
    with pytest.raises(ValueError, match="BETTERAI_LINEAR_ATTENTION_BACKEND=.*'triton'"):
        chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"])


def test_in_kernel_l2norm_equals_normalising_first():
    inputs = make_inputs("gated_delta_rule", length=33, with_state=False)
    raw_k = inputs["k"] * 3.0 + 0.1
    o, final = chunk_gated_delta_rule(inputs["q"], raw_k, inputs["v"], inputs["g"], inputs["beta"],
                                      output_final_state=True, use_qk_l2norm_in_kernel=True, chunk_size=16)
    normalise = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731  fla's l2norm
    ref_o, ref_final = reference_delta_rule(normalise(inputs["q"]), normalise(raw_k), inputs["v"], inputs["beta"],
                                            g=inputs["g"])
    assert relative_error(o, ref_o) < TOLERANCE and relative_error(final, ref_final) < TOLERANCE


def test_in_kernel_gate_and_beta_activations_follow_fla():
    inputs = make_inputs("gated_delta_rule", length=21, heads=2)
    raw_g, raw_beta = torch.randn(2, 21, 2), torch.randn(2, 21, 2)
    a_log, dt_bias = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.5])
    o, final = chunk_gated_delta_rule(
        inputs["q"], inputs["k"], inputs["v"], raw_g, raw_beta, initial_state=inputs["initial_state"],
        output_final_state=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
        use_gate_in_kernel=True, A_log=a_log, dt_bias=dt_bias, chunk_size=8,
    )
    g = -a_log.exp() * F.softplus(raw_g + dt_bias)
    beta = 2 * torch.sigmoid(raw_beta)
    ref_o, ref_final = reference_delta_rule(inputs["q"], inputs["k"], inputs["v"], beta, g=g,
                                            initial_state=inputs["initial_state"])
    assert relative_error(o, ref_o) < TOLERANCE and relative_error(final, ref_final) < TOLERANCE


def test_state_v_first_transposes_states_in_and_out():
    inputs = make_inputs("gla", length=19)
    h0 = inputs["initial_state"]
    _, final = chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], initial_state=h0.transpose(-1, -2),
                         output_final_state=True, state_v_first=True)
    _, ref_final = reference_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], initial_state=h0)
    assert final.shape == ref_final.transpose(-1, -2).shape
    assert relative_error(final, ref_final.transpose(-1, -2)) < TOLERANCE


@pytest.mark.parametrize("kind", ["delta_rule", "gated_delta_rule", "gla"])
def test_packed_variable_length_sequences_match_separate_recurrences(kind):
    lengths = [7, 20, 3]
    pieces = [make_inputs(kind, batch=1, length=n, seed=n) for n in lengths]
    packed = {name: torch.cat([p[name] for p in pieces], dim=0 if name == "initial_state" else 1)
              for name in pieces[0]}
    cu_seqlens = torch.tensor([0, 7, 27, 30])
    args = dict(initial_state=packed["initial_state"], output_final_state=True, cu_seqlens=cu_seqlens,
                chunk_size=8)
    if kind == "delta_rule":
        o, final = chunk_delta_rule(packed["q"], packed["k"], packed["v"], packed["beta"], **args)
    elif kind == "gated_delta_rule":
        o, final = chunk_gated_delta_rule(packed["q"], packed["k"], packed["v"], packed["g"], packed["beta"], **args)
    else:
        o, final = chunk_gla(packed["q"], packed["k"], packed["v"], packed["g"], **args)
    assert final.shape[0] == 3
    for index, (piece, start) in enumerate(zip(pieces, [0, 7, 27])):
        if kind == "gla":
            ref_o, ref_final = reference_gla(piece["q"], piece["k"], piece["v"], piece["g"],
                                             initial_state=piece["initial_state"])
        else:
            ref_o, ref_final = reference_delta_rule(piece["q"], piece["k"], piece["v"], piece["beta"],
                                                    g=piece.get("g"), initial_state=piece["initial_state"])
        assert relative_error(o[:, start:start + lengths[index]], ref_o) < TOLERANCE
        assert relative_error(final[index:index + 1], ref_final) < TOLERANCE


def test_argument_errors_name_the_problem():
    inputs = make_inputs("gated_delta_rule", length=6)
    q, k, v, g, beta = (inputs[n] for n in ("q", "k", "v", "g", "beta"))
    with pytest.raises(ValueError, match="head_first"):
        chunk_gated_delta_rule(q, k, v, g, beta, head_first=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        chunk_gated_delta_rule(q, k, v, g, beta, not_an_option=1)
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="multiple of num key heads"):
        chunk_gated_delta_rule(q, k, v[:, :, :1].expand(-1, -1, 3, -1), g, beta)
    with pytest.raises(ValueError, match="q, k, g must have the same shape"):
        chunk_gla(q, k, v, g)
