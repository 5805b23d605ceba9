"""Linear-attention kernels against independent token-by-token recurrences (written below, run in float64).

Each kernel is called through its fla-style signature with fp32 inputs; the reference runs the recurrence of the
paper one token at a time. Compared: outputs, final states and gradients (of a loss that touches both) within
1e-5 relative (norm-wise), for lengths that are not multiples of the chunk size, with and without an initial
state; chaining two calls through the state; the recurrent (generation) step against the chunked form.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from betterai_megatron.kernels import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
)

TOLERANCE = 1e-5


# ---------------------------------------------------------------- independent references (float64, per token)
def reference_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None):
    """S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T ; o_t = scale S_t^T q_t.  [B,T,H,*] inputs."""
    batch, length, heads, key_dim = q.shape
    value_heads = v.shape[2]
    group = value_heads // heads
    scale = key_dim ** -0.5 if scale is None else scale
    state = [[None] * value_heads for _ in range(batch)]
    outputs = torch.zeros(batch, length, value_heads, v.shape[-1], dtype=torch.float64)
    finals = []
    for b in range(batch):
        for h in range(value_heads):
            s = (initial_state[b, h].double() if initial_state is not None
                 else torch.zeros(key_dim, v.shape[-1], dtype=torch.float64))
            for t in range(length):
                kt, qt = k[b, t, h // group].double(), q[b, t, h // group].double()
                if g is not None:
                    s = torch.exp(g[b, t, h].double()) * s
                s = s - beta[b, t, h].double() * torch.outer(kt, kt @ s) + beta[b, t, h].double() * torch.outer(
                    kt, v[b, t, h].double())
                outputs[b, t, h] = scale * (qt @ s)
            state[b][h] = s
        finals.append(torch.stack(state[b]))
    return outputs, torch.stack(finals)


def reference_gla(q, k, v, g, scale=None, initial_state=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ; o_t = scale S_t^T q_t."""
    batch, length, heads, key_dim = q.shape
    scale = key_dim ** -0.5 if scale is None else scale
    outputs = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    finals = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            s = (initial_state[b, h].double() if initial_state is not None
                 else torch.zeros(key_dim, v.shape[-1], dtype=torch.float64))
            for t in range(length):
                s = torch.exp(g[b, t, h].double())[:, None] * s + torch.outer(k[b, t, h].double(), v[b, t, h].double())
                outputs[b, t, h] = scale * (q[b, t, h].double() @ s)
            finals[b, h] = s
    return outputs, finals


def relative_error(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------- inputs
def make_inputs(kind, *, batch=2, length=50, heads=2, value_heads=None, key_dim=16, value_dim=12, with_state=True,
                gla_decay=(-0.5, 0.0), seed=0):
    gen = torch.Generator().manual_seed(seed)
    value_heads = value_heads or heads

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    inputs = {"q": randn(batch, length, heads, key_dim), "v": randn(batch, length, value_heads, value_dim)}
    if kind == "gla":
        inputs["k"] = randn(batch, length, heads, key_dim)
        low, high = gla_decay
        inputs["g"] = low + (high - low) * torch.rand(batch, length, heads, key_dim, generator=gen)
    else:
        inputs["k"] = F.normalize(randn(batch, length, heads, key_dim), dim=-1)  # the delta rule's contract
        inputs["beta"] = torch.rand(batch, length, value_heads, generator=gen)
        if kind == "gated_delta_rule":
            inputs["g"] = F.logsigmoid(randn(batch, length, value_heads))
    if with_state:
        inputs["initial_state"] = randn(batch, value_heads, key_dim, value_dim)
    return inputs


def call_chunk(kind, inputs, **kwargs):
    i = inputs
    h0 = i.get("initial_state")
    if kind == "delta_rule":
        return chunk_delta_rule(i["q"], i["k"], i["v"], i["beta"], initial_state=h0, output_final_state=True, **kwargs)
    if kind == "gated_delta_rule":
        return chunk_gated_delta_rule(i["q"], i["k"], i["v"], i["g"], i["beta"], initial_state=h0,
                                      output_final_state=True, **kwargs)
    return chunk_gla(i["q"], i["k"], i["v"], i["g"], initial_state=h0, output_final_state=True, **kwargs)


def call_recurrent(kind, inputs):
    i = inputs
    h0 = i.get("initial_state")
    if kind == "delta_rule":
        return fused_recurrent_delta_rule(i["q"], i["k"], i["v"], i["beta"], initial_state=h0, output_final_state=True)
    if kind == "gated_delta_rule":
        return fused_recurrent_gated_delta_rule(i["q"], i["k"], i["v"], g=i["g"], beta=i["beta"], initial_state=h0,
                                                output_final_state=True)
    return fused_recurrent_gla(i["q"], i["k"], i["v"], gk=i["g"], initial_state=h0, output_final_state=True)


def call_reference(kind, inputs):
    i = inputs
    h0 = i.get("initial_state")
    if kind == "gla":
        return reference_gla(i["q"], i["k"], i["v"], i["g"], initial_state=h0)
    return reference_delta_rule(i["q"], i["k"], i["v"], i["beta"], g=i.get("g"), initial_state=h0)


def loss_and_grads(fn, inputs, weights):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
    o, final = fn(leaves)
    loss = (o.double() * weights[0]).sum() + (final.double() * weights[1]).sum()
    loss.backward()
    return o.detach(), final.detach(), {name: t.grad for name, t in leaves.items()}


KINDS = ["delta_rule", "gated_delta_rule", "gla"]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length,chunk_size,with_state", [(50, 16, True), (77, 32, False), (130, 64, True)])
def test_chunked_matches_recurrence_outputs_states_and_gradients(kind, length, chunk_size, with_state):
    inputs = make_inputs(kind, length=length, with_state=with_state, seed=length)
    gen = torch.Generator().manual_seed(1)
    value_heads, value_dim = inputs["v"].shape[2], inputs["v"].shape[3]
    weights = (torch.randn(2, length, value_heads, value_dim, generator=gen, dtype=torch.float64),
               torch.randn(2, value_heads, inputs["q"].shape[-1], value_dim, generator=gen, dtype=torch.float64))
    o, final, grads = loss_and_grads(lambda x: call_chunk(kind, x, chunk_size=chunk_size), inputs, weights)
    ref_o, ref_final, ref_grads = loss_and_grads(lambda x: call_reference(kind, x), inputs, weights)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert o.shape == ref_o.shape and final.shape == ref_final.shape
    assert relative_error(o, ref_o) < TOLERANCE
    assert relative_error(final, ref_final) < TOLERANCE
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) < TOLERANCE, name


@pytest.mark.parametrize("decay", [(-0.5, 0.0), (-2.0, -1.5), (-8.0, -3.0)], ids=["mild", "medium", "strong"])
def test_gla_exact_for_every_decay_regime(decay):
    """Mild decay uses one reference per chunk, medium one per sub-chunk of 16, strong the exact diagonal blocks:
    all three must agree with the recurrence, gradients included (no overflow, no NaN)."""
    inputs = make_inputs("gla", length=70, gla_decay=decay, seed=3)
    weights = (torch.randn(2, 70, 2, 12, dtype=torch.float64), torch.randn(2, 2, 16, 12, dtype=torch.float64))
    o, final, grads = loss_and_grads(lambda x: call_chunk("gla", x), inputs, weights)
    ref_o, ref_final, ref_grads = loss_and_grads(lambda x: call_reference("gla", x), inputs, weights)
    assert relative_error(o, ref_o) < TOLERANCE and relative_error(final, ref_final) < TOLERANCE
    for name in grads:
        assert torch.isfinite(grads[name]).all()
        assert relative_error(grads[name], ref_grads[name]) < TOLERANCE, name


def test_gated_delta_rule_grouped_value_heads_follow_fla():
    """HV > H: value head j reads key head j // (HV // H)."""
    inputs = make_inputs("gated_delta_rule", heads=2, value_heads=4, length=40)
    o, final = call_chunk("gated_delta_rule", inputs, chunk_size=16)
    ref_o, ref_final = call_reference("gated_delta_rule", inputs)
    assert o.shape == (2, 40, 4, 12) and final.shape == (2, 4, 16, 12)
    assert relative_error(o, ref_o) < TOLERANCE and relative_error(final, ref_final) < TOLERANCE


def split_time(inputs, start, end):
    return {name: (t if name == "initial_state" else t[:, start:end]) for name, t in inputs.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_one_call_equals_two_calls_chained_through_the_state(kind):
    inputs = make_inputs(kind, length=90, seed=5)
    o, final = call_chunk(kind, inputs, chunk_size=32)
    first = split_time(inputs, 0, 37)
    o1, state = call_chunk(kind, first, chunk_size=32)
    second = dict(split_time(inputs, 37, 90), initial_state=state)
    o2, final2 = call_chunk(kind, second, chunk_size=32)
    assert relative_error(torch.cat([o1, o2], dim=1), o) < TOLERANCE
    assert relative_error(final2, final) < TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_steps_equal_the_chunked_form(kind):
    """Prefill with the chunked kernel, then generate token by token with the recurrent step."""
    inputs = make_inputs(kind, length=45, seed=7)
    o, final = call_chunk(kind, inputs, chunk_size=16)
    prefix = 30
    outputs, state = [call_chunk(kind, split_time(inputs, 0, prefix), chunk_size=16)[0]], None
    state = call_chunk(kind, split_time(inputs, 0, prefix), chunk_size=16)[1]
    for t in range(prefix, 45):
        step_o, state = call_recurrent(kind, dict(split_time(inputs, t, t + 1), initial_state=state))
        assert step_o.shape[1] == 1
        outputs.append(step_o)
    assert relative_error(torch.cat(outputs, dim=1), o) < TOLERANCE
    assert relative_error(state, final) < TOLERANCE
    # the recurrent form over the whole sequence is the reference recurrence as well
    rec_o, rec_final = call_recurrent(kind, inputs)
    ref_o, ref_final = call_reference(kind, inputs)
    assert relative_error(rec_o, ref_o) < TOLERANCE and relative_error(rec_final, ref_final) < TOLERANCE


def test_half_precision_inputs_keep_dtype_and_fp32_state():
    inputs = {n: t.to(torch.bfloat16) if n != "initial_state" else t for n, t in make_inputs("gla").items()}
    o, final = call_chunk("gla", inputs)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref_o, _ = call_reference("gla", inputs)
    assert relative_error(o, ref_o) < 2e-2
