"""Properties of sinks and normalize=False over random expressions: the eager backend equals the dense float64
attention of test_properties.py's independent interpreter, with the sink as one more softmax column (no value)
and the numerator alone for normalize=False; gradients to q, k, v and the sink's tensor. Random scores with row
terms exercise the simplifier's shift rule with a sink (the sink is shifted by the dropped term)."""

import math

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_properties import HKV, HQ, MASKS, SCORES, B, D, _f, env_for, node

import attnlang as al

_SINK_TERMS = [
    node("tf[h]", lambda e: e["tf"][e["h"]]),
    node("0.25 * float(q_idx)", lambda e: 0.25 * _f(e["q_idx"])),
    node("(-0.5)", lambda e: _f(-0.5)),
    node("float(b) - 1.0", lambda e: _f(e["b"]) - 1.0),
    node("tf[h] * float(q_len)", lambda e: e["tf"][e["h"]] * _f(e["q_len"])),
    node("(-inf)", lambda e: _f(-math.inf)),
]
SINKS = st.lists(st.sampled_from(_SINK_TERMS), min_size=1, max_size=3).map(
    lambda terms: node(" + ".join(t[0] for t in terms),
                       lambda e, terms=terms: sum((t[1](e) for t in terms[1:]), terms[0][1](e))))


def dense_with_sink(scores, allowed, v, sink, normalize):
    group = HQ // HKV
    vv = v.repeat_interleave(group, dim=1)
    s3 = torch.where(allowed, scores, torch.tensor(-math.inf, dtype=torch.float64))
    cols = s3 if sink is None else torch.cat([s3, sink], dim=-1)
    lse = torch.logsumexp(cols, dim=-1)
    if not normalize:
        return torch.exp(s3) @ vv, lse
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    return torch.exp(s3 - safe[..., None]) @ vv, lse


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much])
@given(SCORES, MASKS, st.one_of(st.none(), SINKS), st.booleans(), st.sampled_from([(7, 11), (1, 5), (6, 1)]),
       st.integers(0, 3))
def test_sinks_and_unnormalized_equal_dense_float64(score, mask, sink, normalize, lengths, seed):
    sq, skv = lengths
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, D, generator=g, dtype=torch.float64).requires_grad_(True)
               for h, s in ((HQ, sq), (HKV, skv), (HKV, skv)))
    env = env_for(q, k, sq, skv, seed)
    env["tf"].requires_grad_(True)
    shape = (B, HQ, sq, skv)
    want_s = torch.broadcast_to(_f(score[1](env)), shape)
    allowed = torch.broadcast_to(mask[1](env), shape)
    assume(not ((torch.isnan(want_s) | (want_s == math.inf)) & allowed).any())
    assume(normalize or bool((torch.where(allowed, want_s, 0.0) < 30).all()))  # the numerator stays finite
    sink_v = None if sink is None else torch.broadcast_to(_f(sink[1](env)), (B, HQ, sq, 1))
    want_out, want_lse = dense_with_sink(want_s, allowed, v, sink_v, normalize)
    finite = torch.isfinite(want_lse)
    inputs = (q, k, v, env["tf"])
    d_out = torch.randn(want_out.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((want_out * d_out).sum() + torch.where(finite, want_lse, 0.0).sum(), inputs,
                               allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for w, t in zip(want, inputs)]
    assume(all(torch.isfinite(w).all() for w in want))

    var = al.compile(score[0], mask[0], sink=None if sink is None else sink[0], normalize=normalize)
    text = score[0] + mask[0] + ("" if sink is None else sink[0])
    tensors = {n: env[n] for n in ("tf", "ti", "tb") if f"{n}[" in text}
    out, lse = var(q, k, v, backend="eager", return_lse=True, **tensors)
    context = f"score {score[0]!r} mask {mask[0]!r} sink {None if sink is None else sink[0]!r} normalize {normalize}"
    torch.testing.assert_close(out, want_out, rtol=1e-7, atol=1e-7, msg=lambda m: f"{context}\n{m}")
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), context
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad((out * d_out).sum() + torch.where(finite, lse.double(), 0.0).sum(), inputs,
                              allow_unused=True)
    got = [torch.zeros_like(t) if x is None else x for x, t in zip(got, inputs)]
    for name, x, w in zip("q k v tf".split(), got, want):
        assert torch.isfinite(x).all(), (name, context)
        torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {context}\n{m}")
