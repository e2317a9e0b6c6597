"""The softmax's denominator (LANGUAGE.md): sinks and normalize=False.

Eager and flex (CPU) against an independent float64 computation written out here (the sink as one extra column
of the softmax; the numerator alone for normalize=False), gradients included (q, k, v and the sink's tensor);
GQA, decode, odd lengths, fully masked rows; the simplifier's shift rule with a sink; errors with carets; the
canonical form, configs, explain and the command line."""

import json
import math
import pickle

import pytest
import torch

import attnlang as al
from attnlang.cli import main

B, HQ, HKV, D = 2, 4, 2, 8


def make_qkv(sq=13, skv=21, seed=0, requires_grad=False, hq=HQ, hkv=HKV):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, h, s, D, generator=g, dtype=torch.float64) for h, s in ((hq, sq), (hkv, skv), (hkv, skv))]
    return tuple(t.requires_grad_(requires_grad) for t in out)


def dense(q, k, v, score_fn, mask_fn, sink_fn=None, normalize=True, t=None):
    """float64 attention with the sink as an extra softmax column (no value): out [B,Hq,Sq,Dv], lse [B,Hq,Sq].
    score_fn(s, b, h, i, j, sq, skv, t), mask_fn(b, h, i, j, sq, skv), sink_fn(b, h, i, sq, skv, t); t: tensors."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    vv = v.double().repeat_interleave(hq // hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    bi, hi = torch.arange(b).view(b, 1, 1, 1), torch.arange(hq).view(1, hq, 1, 1)
    qi, ki = torch.arange(sq).view(1, 1, sq, 1), torch.arange(skv).view(1, 1, 1, skv)
    s2 = torch.broadcast_to(score_fn(s, bi, hi, qi, ki, sq, skv, t), s.shape)
    allowed = torch.broadcast_to(mask_fn(bi, hi, qi, ki, sq, skv), s.shape)
    s3 = torch.where(allowed, s2, torch.tensor(-math.inf, dtype=torch.float64))
    cols = s3
    if sink_fn is not None:
        sink = torch.broadcast_to(torch.as_tensor(sink_fn(bi, hi, qi, sq, skv, t)).double(), (b, hq, sq, 1))
        cols = torch.cat([s3, sink], dim=-1)
    lse = torch.logsumexp(cols, dim=-1)
    if not normalize:
        return torch.exp(s3) @ vv, lse
    return torch.exp(s3 - lse[..., None]) @ vv, lse


SINKS = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
GATE = torch.linspace(-1, 1, B * 13, dtype=torch.float64).view(B, 13)


def causal(b, h, i, j, sq, skv):
    return i >= j


def bottom_right(b, h, i, j, sq, skv):
    return j <= i + skv - sq


def everything(*_):
    return torch.tensor(True)


def plain(s, *_):
    return s


# name, compile kwargs, tensors, score_fn, mask_fn, sink_fn, normalize
CASES = [
    ("gpt_oss_window", dict(mask="kv_idx <= q_idx + kv_len - q_len & q_idx + kv_len - q_len - kv_idx < 5",
                            sink="sinks[h]"), {"sinks": SINKS}, plain,
     lambda b, h, i, j, sq, skv: (j <= i + skv - sq) & (i + skv - sq - j < 5),
     lambda b, h, i, sq, skv, t: t["sinks"][h], True),
    ("softmax_plus_one", dict(sink="0"), {}, plain, everything, lambda *a: torch.zeros(()), True),
    ("row_sink", dict(mask="kv_idx <= q_idx + kv_len - q_len", sink="gate[b, q_idx] + 0.1 * h"), {"gate": GATE},
     plain, bottom_right, lambda b, h, i, sq, skv, t: t["gate"][b, i] + 0.1 * h.double(), True),
    ("sigmoid", dict(score="log(sigmoid(score - log(float(kv_len))))", normalize=False), {},
     lambda s, b, h, i, j, sq, skv, t: torch.log(torch.sigmoid(s - math.log(skv))), everything, None, False),
    ("sink_unnormalized", dict(score="score * 0.5", mask="q_idx >= kv_idx", sink="sinks[h]", normalize=False),
     {"sinks": SINKS}, lambda s, *_: s * 0.5, causal, lambda b, h, i, sq, skv, t: t["sinks"][h], False),
    ("shifted_sink", dict(score="score + sinks[h] * 2.0 + 0.25 * q_idx", mask="q_idx >= kv_idx", sink="sinks[h]"),
     {"sinks": SINKS}, lambda s, b, h, i, j, sq, skv, t: s + t["sinks"][h] * 2.0 + 0.25 * i.double(), causal,
     lambda b, h, i, sq, skv, t: t["sinks"][h], True),
    ("unnormalized_row_term", dict(score="score + 1.0 + 0.1 * q_idx", normalize=False), {},
     lambda s, b, h, i, j, sq, skv, t: s + 1.0 + 0.1 * i.double(), everything, None, False),
]


def _leaves(tensors):
    return {n: t.clone().requires_grad_(True) for n, t in tensors.items()}


@pytest.mark.parametrize("sq, skv", [(13, 21), (5, 21), (13, 13)], ids=["odd", "decode", "square"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_eager_against_float64_with_gradients(case, sq, skv):
    _, kwargs, tensors, score_fn, mask_fn, sink_fn, normalize = case
    if "gate" in tensors and sq != 13:
        pytest.skip("the gate table holds 13 rows")
    var = al.compile(**kwargs)
    q, k, v = make_qkv(sq, skv, requires_grad=True)
    got_t, want_t = _leaves(tensors), _leaves(tensors)
    out, lse = var(q, k, v, backend="eager", return_lse=True, **got_t)
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = dense(qr, kr, vr, score_fn, mask_fn, sink_fn, normalize, want_t)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    wl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum() + (lse.double() * wl).sum(), [q, k, v, *got_t.values()])
    want = torch.autograd.grad((ref_out * w).sum() + (ref_lse * wl).sum(), [qr, kr, vr, *want_t.values()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gqa_and_head_counts():
    var = al.compile(mask="q_idx >= kv_idx", sink="sinks[h]")
    sinks = torch.randn(8, dtype=torch.float64)
    q, k, v = make_qkv(9, 9, hq=8, hkv=2)
    out, lse = var(q, k, v, sinks=sinks, return_lse=True)
    ref_out, ref_lse = dense(q, k, v, plain, causal, lambda b, h, i, sq, skv, t: sinks[h])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


def test_fully_masked_rows_give_zero_and_the_sink():
    var = al.compile(mask="q_idx >= kv_idx + 3", sink="sinks[h]")  # rows 0..2 have no allowed key
    q, k, v = make_qkv(9, 9, requires_grad=True)
    sinks = SINKS.clone().requires_grad_(True)
    out, lse = var(q, k, v, sinks=sinks, return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    torch.testing.assert_close(lse[:, :, :3].double(), SINKS.view(1, 4, 1).expand(B, 4, 3).clone())
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v, sinks):
        assert torch.isfinite(t.grad).all()
    # d lse / d sink = 1 on an empty row: each head's sink gets at least B * 3 from the empty rows
    assert (sinks.grad >= B * 3 - 1e-9).all()


def test_sink_of_minus_inf_is_no_sink():
    q, k, v = make_qkv()
    plain_v = al.compile(mask="q_idx >= kv_idx")
    assert al.compile(mask="q_idx >= kv_idx", sink="-inf") == plain_v
    assert hash(al.compile(mask="q_idx >= kv_idx", sink="-inf")) == hash(plain_v)
    t = torch.full((HQ,), -math.inf, dtype=torch.float64)
    with_t = al.compile(mask="q_idx >= kv_idx", sink="sinks[h]")
    o1, l1 = plain_v(q, k, v, return_lse=True)
    o2, l2 = with_t(q, k, v, sinks=t, return_lse=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)
    # rows with neither a key nor a sink: out 0, lse -inf, gradients finite
    empty = al.compile(mask="q_idx >= kv_idx + 3", sink="sinks[h]")
    q, k, v = make_qkv(9, 9, requires_grad=True)
    sinks = t.clone().requires_grad_(True)
    out, lse = empty(q, k, v, sinks=sinks, return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert (lse[:, :, :3] == -math.inf).all()
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(sinks.grad).all()


def test_shift_rule_moves_the_row_term_into_the_sink():
    from attnlang.printer import to_source
    var = al.compile(score="score + 2.0 + 0.5 * q_idx", mask="q_idx >= kv_idx", sink="1.0")
    s = var.simplified
    assert "shift_invariance" in s.trace
    assert to_source(s.score) == "score"
    assert "q_idx" in to_source(s.lse_shift)
    assert "q_idx" in to_source(s.sink)  # the sink is shifted by the dropped row term: sink - c
    q, k, v = make_qkv()
    out, lse = var(q, k, v, return_lse=True)
    ref_out, ref_lse = dense(q, k, v, lambda s_, b, h, i, j, sq, skv, t: s_ + 2.0 + 0.5 * i.double(), causal,
                             lambda *a: torch.ones(()))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)
    # without the sink shift the output would differ: the row term moves mass against the sink
    unshifted = al.compile(mask="q_idx >= kv_idx", sink="1.0")(q, k, v)
    assert (unshifted - out).abs().max() > 1e-3


def test_shift_rule_off_without_normalization():
    var = al.compile(score="score + 2.0", normalize=False)
    assert var.simplified.lse_shift is None and "shift_invariance" not in var.simplified.trace
    assert var != al.compile(score="score", normalize=False)
    q, k, v = make_qkv()
    torch.testing.assert_close(var(q, k, v), al.compile(normalize=False)(q, k, v) * math.exp(2.0))


def test_infinite_row_term_with_a_sink():
    # log(q_idx) is -inf on row 0: that row has no key left; with the sink, out 0 and lse = sink there
    var = al.compile(score="score + log(float(q_idx))", mask="q_idx >= kv_idx", sink="0.5")
    q, k, v = make_qkv(7, 7)
    out, lse = var(q, k, v, return_lse=True)
    ref_out, ref_lse = dense(q, k, v, lambda s, b, h, i, j, sq, skv, t: s + torch.log(i.double()), causal,
                             lambda *a: torch.tensor(0.5))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))


def test_dropped_score_tensor_gets_its_gradient_through_the_shifted_sink():
    # bias[h] drops out of the score, but with a sink the output depends on it
    var = al.compile(score="score + bias[h]", sink="0")
    q, k, v = make_qkv()
    bias = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    out = var(q, k, v, bias=bias)
    out.sum().backward()
    br = bias.detach().clone().requires_grad_(True)
    ref, _ = dense(q, k, v, lambda s, b, h, i, j, sq, skv, t: s + br[h], everything, lambda *a: torch.zeros(()))
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(bias.grad, br.grad)
    assert bias.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [
    dict(mask="q_idx >= kv_idx", sink="sinks[h]"),
    dict(score="log(sigmoid(score - 1.5))", normalize=False),
    dict(mask="kv_idx <= q_idx + kv_len - q_len", sink="gate[b, q_idx] * 2.0", normalize=False),
], ids=["sinks", "sigmoid", "row_unnormalized"])
def test_flex_cpu_agrees_with_eager(kwargs):
    var = al.compile(**kwargs)
    q, k, v = make_qkv(13, 21)
    tensors = {n: t for n, t in {"sinks": SINKS, "gate": GATE}.items() if n in var.tensor_names}
    o1, l1 = var(q, k, v, backend="eager", return_lse=True, **tensors)
    o2, l2 = var(q, k, v, backend="flex", return_lse=True, **tensors)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(l2, l1)


def test_flex_cpu_compiled_agrees_with_eager():
    var = al.compile(mask="q_idx >= kv_idx", sink="sinks[h]")
    q, k, v = (t.float() for t in make_qkv(13, 21))
    sinks = SINKS.float()
    o1 = var(q, k, v, backend="eager", sinks=sinks)
    o2 = var(q, k, v, backend="flex", kernel_options={"CPU_COMPILED": True}, sinks=sinks)
    torch.testing.assert_close(o2, o1, atol=2e-5, rtol=2e-5)


def test_flex_cpu_refuses_sink_gradients():
    var = al.compile(sink="sinks[h]")
    q, k, v = make_qkv()
    with pytest.raises(al.AttnLangError, match="backward"):
        var(q, k, v, backend="flex", sinks=SINKS.clone().requires_grad_(True))


# ----- errors -----

@pytest.mark.parametrize("sink, column, word", [
    ("score", 1, "'score' cannot be used in a sink"),
    ("sinks[h] + kv_idx", 12, "'kv_idx' cannot be used in a sink"),
    ("q_idx > 3", 1, "bool"),
    ("sinks[h] + nope", 12, "'nope' was not given"),
    ("foo(h)", 1, "unknown function"),
    ("sinks[h] + sinks", 12, "without an index"),
    ("sinks[h] +", 11, "unexpected end"),
    ("sinks[kv_idx]", 7, "'kv_idx' cannot be used"),
])
def test_bad_sinks_have_a_caret(sink, column, word):
    with pytest.raises(al.AttnLangError) as e:
        al.compile(mask="q_idx >= kv_idx", sink=sink, params={} if "sinks" in sink else None)
    err = e.value
    assert err.where == "sink"
    assert err.column == column, str(err)
    assert word in str(err)
    assert str(err).startswith("sink expression, line 1")
    assert "^" in str(err).splitlines()[-1]


def test_sink_index_that_can_leave_its_tensor():
    var = al.compile(sink="t[q_idx]")
    q, k, v = make_qkv(13, 21)
    with pytest.raises(al.AttnLangError) as e:
        var(q, k, v, t=torch.zeros(5, dtype=torch.float64))
    assert e.value.where == "sink" and e.value.column == 3
    assert "clamp" in str(e.value)
    out = al.compile(sink="t[clamp(q_idx, 0, 4)]")(q, k, v, t=torch.zeros(5, dtype=torch.float64))
    assert out.shape == q.shape


def test_bool_tensor_sink_at_call_time():
    var = al.compile(sink="t[h]")
    q, k, v = make_qkv()
    with pytest.raises(al.AttnLangError) as e:
        var(q, k, v, t=torch.ones(HQ, dtype=torch.bool))
    assert e.value.where == "sink"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_sink_values_are_errors(value):
    var = al.compile(sink="t[h]")
    q, k, v = make_qkv()
    t = torch.zeros(HQ, dtype=torch.float64)
    t[2] = value
    with pytest.raises(al.AttnLangError) as e:
        var(q, k, v, t=t)
    assert e.value.where == "sink" and "h=2" in str(e.value)


@pytest.mark.parametrize("backend", ["eager", "flex"])
@pytest.mark.parametrize("sink", ["clamp(t[h] * 0.0, -3.0, 3.0)", "clamp(t[h] % -1.5, -3.0, 3.0)",
                                  "min(max(t[h] - t[h], -1.0), 1.0)"])
def test_a_nan_sink_inside_clamp_is_an_error_not_a_nan_result(backend, sink):
    # clamp / min / max bound the sink's interval, but a NaN (here from -inf * 0, -inf % c, -inf - -inf) passes
    # through them: the call returned NaN out and lse instead of the sink's error
    var = al.compile(mask="q_idx >= kv_idx", sink=sink)
    q, k, v = make_qkv()
    t = torch.zeros(HQ, dtype=torch.float64)
    t[1] = -math.inf
    with pytest.raises(al.AttnLangError) as e:
        var(q, k, v, t=t, backend=backend)
    assert e.value.where == "sink" and "nan" in str(e.value) and "h=1" in str(e.value)
    out, lse = var(q, k, v, t=torch.zeros(HQ, dtype=torch.float64), backend=backend, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_sink_past_float32_is_an_error_not_an_inf_lse(backend):
    # finite in exact arithmetic (1e10 * 1e30), inf in the float32 the call computes the sink in: an error, not
    # lse = inf; in float64 it is a finite sink
    var = al.compile(sink="t[h] * 1e30", mask="kv_idx < q_idx")
    q, k, v = make_qkv()  # float64
    t = torch.zeros(HQ)
    t[1] = 1e10
    with pytest.raises(al.AttnLangError, match="sink expression gives inf") as e:
        var(q.float(), k.float(), v.float(), backend=backend, return_lse=True, t=t)
    assert e.value.where == "sink" and "h=1" in str(e.value)
    out, lse = var(q, k, v, backend=backend, return_lse=True, t=t.double())
    assert lse[0, 1, 0].item() == 1e40 and torch.isfinite(lse).all()


def test_bad_argument_types():
    with pytest.raises(al.AttnLangError, match="sink must be a string"):
        al.compile(sink=0)
    with pytest.raises(al.AttnLangError, match="normalize must be True or False"):
        al.compile(normalize=0)
    with pytest.raises(al.AttnLangError, match="empty expression"):
        al.compile(sink="  ")


def test_params_and_tensors_used_only_by_the_sink():
    var = al.compile(sink="c0 + t[h]", params={"c0": 1.5})
    assert var.tensor_names == ("t",)
    q, k, v = make_qkv()
    with pytest.raises(al.AttnLangError, match="'t' is read here"):
        var(q, k, v)
    with pytest.raises(al.AttnLangError, match="unused|neither"):
        al.compile(sink="1.0", params={"c0": 1.5})


# ----- identity, configs, explain, CLI -----

def test_canonical_equality_hash_repr_pickle():
    a = al.compile(mask="q_idx >= kv_idx", sink="sinks[h]")
    assert a == al.compile(mask="kv_idx <= q_idx", sink="sinks[h]")
    assert al.compile(sink="1.0 + 1.0") == al.compile(sink="2.0")
    assert a != al.compile(mask="q_idx >= kv_idx")
    assert a != al.compile(mask="q_idx >= kv_idx", sink="sinks[h]", normalize=False)
    assert al.compile() != al.compile(normalize=False)
    assert len({a, al.compile(mask="kv_idx <= q_idx", sink="sinks[h]")}) == 1
    assert "sink='sinks[h]'" in repr(a)
    assert "normalize=False" in repr(al.compile(normalize=False))
    assert pickle.loads(pickle.dumps(a)) == a
    assert a.sink == "sinks[h]" and a.normalize is True
    # existing variants keep their key
    assert len(al.compile(mask="q_idx >= kv_idx").canonical) == 3


def test_configs():
    plain_v = al.compile(mask="q_idx >= kv_idx")
    assert set(plain_v.to_config()) == {"score", "mask", "params"}
    var = al.compile(score="log(sigmoid(score - b0))", sink="sinks[h]", normalize=False, params={"b0": 2.0})
    cfg = var.to_config()
    assert cfg["sink"] == "sinks[h]" and cfg["normalize"] is False
    assert al.from_config(cfg) == var
    assert al.from_config(json.dumps(cfg)) == var
    assert al.from_config({"score": "score", "mask": "q_idx >= kv_idx", "params": {}}) == plain_v
    assert al.from_config("sink: '0'\nnormalize: false\n") == al.compile(sink="0", normalize=False)
    assert al.from_config({"sink": 1}) == al.compile(sink="1")  # a YAML / JSON number spells its expression
    with pytest.raises(al.AttnLangError, match="'sink' must be a string"):
        al.from_config({"sink": [1]})
    with pytest.raises(al.AttnLangError, match="'normalize' must be true or false"):
        al.from_config({"normalize": "no"})
    with pytest.raises(al.AttnLangError) as e:
        al.from_config({"sink": "kv_idx"})
    assert e.value.where == "sink"


def test_explain_shows_the_sink():
    text = al.compile(score="score + 1.0", mask="q_idx >= kv_idx", sink="sinks[h]").explain()
    assert "sink:  sinks[h]" in text
    assert "sinks[h] - 1.0" in text  # the simplified sink, shifted by the dropped row term
    assert "normalize: False" in al.compile(normalize=False).explain()


def test_cli_sink_and_no_normalize(capsys):
    assert main(["check", "--mask", "q_idx >= kv_idx", "--sink", "sinks[h]", "--no-normalize"]) == 0
    out = capsys.readouterr().out
    assert "sink: sinks[h]" in out and "normalize: False" in out
    assert main(["explain", "--sink", "0", "--no-normalize", "--q-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "sink:  0" in out and "normalize: False" in out
    assert main(["check", "--sink", "kv_idx"]) == 2
    err = capsys.readouterr().err
    assert "sink expression, line 1, column 1" in err and err.rstrip().endswith("^^^^^^")


# ----- the fa4 backend's sink plumbing, with a stand-in for flash_attn.cute (no GPU here) -----

class FakeFA4:
    """flash_attn_func for mask-free / window-flag calls, in plain differentiable torch on [B, S, H, D]: FA4's
    semantics of window_size (bottom-right) and learnable_sink (one extra softmax column per query head)."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(None, None),
                        learnable_sink=None, score_mod=None, mask_mod=None, return_lse=False, **_):
        assert score_mod is None and mask_mod is None and not causal
        self.calls.append({"learnable_sink": learnable_sink, "window_size": window_size})
        B, Sq, H, _ = q.shape
        Skv, Hkv = k.shape[1], k.shape[2]
        qq = q.transpose(1, 2).double()
        kk = k.transpose(1, 2).double().repeat_interleave(H // Hkv, 1)
        vv = v.transpose(1, 2).double().repeat_interleave(H // Hkv, 1)
        s = qq @ kk.transpose(-1, -2) * softmax_scale
        i, j = torch.arange(Sq).view(-1, 1) + Skv - Sq, torch.arange(Skv).view(1, -1)
        allowed = torch.ones(Sq, Skv, dtype=torch.bool)
        left, right = window_size
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
        s = s.masked_fill(~allowed, -math.inf)
        cols = s
        if learnable_sink is not None:
            cols = torch.cat([s, learnable_sink.double().view(1, H, 1, 1).expand(B, H, Sq, 1)], -1)
        lse = torch.logsumexp(cols, -1)
        safe = torch.where(torch.isinf(lse), 0.0, lse)
        out = torch.exp(s - safe[..., None]) @ vv
        return out.to(q.dtype).transpose(1, 2), lse.float()


@pytest.fixture
def fake_fa4(monkeypatch):
    from attnlang.backends import fa4
    fake = FakeFA4()
    monkeypatch.setattr(fa4, "_flash", lambda: fake)
    return fake


@pytest.mark.parametrize("kwargs, native, options", [
    (dict(mask="q_idx + kv_len - q_len >= kv_idx & q_idx + kv_len - q_len - kv_idx < 4", sink="sinks[h]"), True,
     None),
    (dict(mask="q_idx + kv_len - q_len >= kv_idx", sink="sinks[h] * 0.5 - 1.0"), True, None),
    (dict(mask="q_idx + kv_len - q_len >= kv_idx", sink="0"), True, None),
    (dict(mask="q_idx + kv_len - q_len >= kv_idx", sink="sinks[h]"), False, {"native_sink": False}),
    (dict(mask="q_idx + kv_len - q_len >= kv_idx", sink="gate[b, q_idx]"), False, None),
    (dict(mask="q_idx + kv_len - q_len >= kv_idx", sink="sinks[h]", normalize=False), True, None),
    (dict(normalize=False), False, None),
], ids=["window_sinks", "head_expr", "plus_one", "not_native", "row_sink", "sink_unnormalized", "unnormalized"])
def test_fa4_sink_plumbing_with_a_stand_in_kernel(fake_fa4, kwargs, native, options):
    from attnlang.backends import fa4
    var = al.compile(**kwargs)
    q, k, v = (t.float().requires_grad_(True) for t in make_qkv(13, 21))
    tensors = {n: t.float().clone().requires_grad_(True) for n, t in (("sinks", SINKS), ("gate", GATE))
               if n in var.tensor_names}
    plan = var._plan(q, k, v, None, "fa4", True, options, tensors)
    assert fa4.native_sink(plan) is (native and plan.sink is not None)
    out, lse = fa4.attention(q, k, v, plan)
    passed = fake_fa4.calls[-1]["learnable_sink"]
    assert (passed is not None) is (native and plan.sink is not None)
    if kwargs.get("sink") == "sinks[h]" and native:
        assert passed is tensors["sinks"]  # handed over as it is: no kernel per call
    ref_t = {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()}
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse = var(qr, kr, vr, backend="eager", return_lse=True, **ref_t)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((out * w).sum() + lse.sum(), [q, k, v, *tensors.values()])
    want = torch.autograd.grad((ref_out * w).sum() + ref_lse.sum(), [qr, kr, vr, *ref_t.values()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

