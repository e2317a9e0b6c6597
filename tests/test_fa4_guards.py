"""The fa4 backend's guards on the CPU, with a stand-in for flash_attn.cute's interface: which calls get zero-padded
head dims or expanded k / v (the GUARDS table), and that padding leaves out, lse and every gradient unchanged."""

import math
import types

import pytest
import torch

import attnlang as al
from attnlang.backends import fa4


class FakeFlash:
    """flash_attn_func on [B, S, H, D] views, in differentiable torch ops (window (None, 0) = bottom-right causal),
    recording the shapes it was given."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, softmax_scale, causal, window_size, score_mod, score_mod_bwd, mask_mod,
                        aux_tensors, block_sparse_tensors, block_sparse_tensors_bwd, return_lse, num_splits=1):
        assert score_mod is None and mask_mod is None and not causal
        self.calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
        group = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
        s = softmax_scale * qh @ kh.transpose(-1, -2)
        if window_size == (None, 0):
            Sq, Skv = s.shape[-2:]
            allowed = torch.arange(Skv)[None, :] <= torch.arange(Sq)[:, None] + (Skv - Sq)
            s = s.masked_fill(~allowed, -math.inf)
        else:
            assert window_size == (None, None)
        lse = torch.logsumexp(s, -1)
        out = torch.softmax(s, -1) @ vh
        return out.to(q.dtype).transpose(1, 2), lse.float()


@pytest.fixture
def fake(monkeypatch):
    f = FakeFlash()
    monkeypatch.setattr(fa4, "_flash", lambda: types.SimpleNamespace(flash_attn_func=f.flash_attn_func))
    return f


def _run(variant, B, Hq, Hkv, Sq, Skv, D, grads, options=None):
    g = torch.Generator().manual_seed(D + Hkv)
    q = torch.randn(B, Hq, Sq, D, generator=g).requires_grad_(grads)
    k = torch.randn(B, Hkv, Skv, D, generator=g).requires_grad_(grads)
    v = torch.randn(B, Hkv, Skv, D, generator=g).requires_grad_(grads)
    plan = variant._plan(q, k, v, None, "fa4", True, options, {})
    out, lse = fa4.attention(q, k, v, plan)
    ref, ref_lse = variant(q, k, v, backend="eager", return_lse=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if grads:
        dout = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref, (q, k, v), dout)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


CAUSAL = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")


@pytest.mark.parametrize("D", [8, 16, 48, 80])
def test_backward_calls_at_head_dims_off_32_run_padded(fake, D):
    _run(CAUSAL, 1, 4, 4, 37, 53, D, grads=True)
    (qs, ks, vs), = fake.calls
    assert qs[-1] == ks[-1] == vs[-1] == -(-D // 32) * 32


@pytest.mark.parametrize("D", [32, 64, 96, 128])
def test_head_dims_of_multiples_of_32_run_as_they_are(fake, D):
    _run(CAUSAL, 1, 4, 4, 37, 37, D, grads=True)
    assert fake.calls[0][0][-1] == D


def test_forward_only_calls_are_not_padded(fake):
    with torch.no_grad():
        _run(CAUSAL, 1, 4, 4, 37, 37, 48, grads=False)
    assert fake.calls[0][0][-1] == 48


def test_grouped_heads_off_32_are_padded_and_expanded(fake):
    _run(CAUSAL, 2, 4, 2, 29, 29, 16, grads=True)
    (qs, ks, vs), = fake.calls
    assert qs[-1] == 32 and ks[2] == 4 and vs[2] == 4  # [B, S, H, D]: H expanded to the query heads


def test_grouped_heads_at_64_without_modifier_stay_grouped(fake):
    _run(CAUSAL, 2, 4, 2, 29, 29, 64, grads=True)
    assert fake.calls[0][1][2] == 2


def test_guards_option_off_runs_the_kernel_as_is(fake):
    _run(CAUSAL, 1, 4, 2, 29, 29, 48, grads=True, options={"guards": False})
    (qs, ks, _), = fake.calls
    assert qs[-1] == 48 and ks[2] == 2


def test_guard_table_rows():
    assert [g.fix for g in fa4.guards_for(48, 48, False, False, True)] == ["pad32"]
    assert {g.fix for g in fa4.guards_for(16, 16, True, False, True)} == {"pad32", "expand"}
    assert [g.fix for g in fa4.guards_for(64, 64, True, True, True)] == ["expand"]
    assert fa4.guards_for(64, 64, True, False, True) == ()
    assert fa4.guards_for(64, 48, False, False, True)[0].fix == "pad32"  # a value head dim off 32 counts too
    assert fa4.guards_for(48, 48, True, True, False) == ()  # forward only: never
    for g in fa4.GUARDS:
        assert g.fix in ("pad32", "expand") and g.wrong and g.evidence


def test_guards_option_is_a_known_option():
    assert fa4._check_options({"guards": False}) is None
    assert "True or False" in fa4._check_options({"guards": 1})

