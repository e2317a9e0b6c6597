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
        self.direct = []  # "fwd" / "bwd": calls of _flash_attn_fwd / _flash_attn_bwd

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

    # FA4's two functions under flash_attn_func, as the direct training path calls them (attnlang.op)
    def _flash_attn_fwd(self, q, k, v, softmax_scale, causal, softcap, window_size_left, window_size_right,
                        score_mod, mask_mod, aux_tensors, block_sparse_tensors, return_lse):
        assert softcap == 0.0 and not any(t.requires_grad for t in (q, k, v))
        self.direct.append("fwd")
        out, lse = self.flash_attn_func(q, k, v, softmax_scale, causal, (window_size_left, window_size_right),
                                        score_mod, None, mask_mod, aux_tensors, block_sparse_tensors, None, True)
        return out.contiguous(), lse if return_lse else None, None, None, None

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale, causal, softcap, window_size_left,
                        window_size_right, score_mod, score_mod_bwd, mask_mod, aux_tensors, block_sparse_tensors,
                        dlse):
        assert softcap == 0.0 and not causal and out.shape == dout.shape
        self.direct.append("bwd")
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            o, ls = self.flash_attn_func(qq, kk, vv, softmax_scale, causal, (window_size_left, window_size_right),
                                         score_mod, None, mask_mod, aux_tensors, None, None, True)
            self.calls.pop()
            outs, gouts = [o], [dout]
            if dlse is not None:
                outs.append(ls)
                gouts.append(dlse)
            # dq / dk / dv in FA4's own layout: contiguous [B, S, H, D]
            return tuple(g.contiguous() for g in torch.autograd.grad(outs, (qq, kk, vv), gouts))


@pytest.fixture
def fake(monkeypatch):
    f = FakeFlash()
    monkeypatch.setattr(fa4, "_flash", lambda: types.SimpleNamespace(
        flash_attn_func=f.flash_attn_func, _flash_attn_fwd=f._flash_attn_fwd, _flash_attn_bwd=f._flash_attn_bwd))
    return f


def _run(variant, B, Hq, Hkv, Sq, Skv, D, grads, options=None):
    g = torch.Generator().manual_seed(D + Hkv)
    q = torch.randn(B, Hq, Sq, D, generator=g).requires_grad_(grads)
    k = torch.randn(B, Hkv, Skv, D, generator=g).requires_grad_(grads)
    v = torch.randn(B, Hkv, Skv, D, generator=g).requires_grad_(grads)
    plan = variant._plan(q, k, v, None, "fa4", True, options, {})
    out, lse = fa4.attention(q, k, v, plan)
    assert_matches_eager(variant, q, k, v, out, lse, grads, g)


def assert_matches_eager(variant, q, k, v, out, lse, grads: bool, g: torch.Generator):
    """out, lse and (with ``grads``) dq / dk / dv of a stand-in FA4 call against the eager reference (the
    cotangent of out drawn from ``g``)."""
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
    assert fake.direct == ["fwd"]  # inference calls _flash_attn_fwd itself, not flash_attn_func's Function


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



def _op_training(variant, q, k, v, return_lse):
    """out (and lse) of the custom op that a compiled graph calls (attnlang.op), backend fa4, with gradients."""
    from attnlang import op
    key = op.call_key(variant._op_config, "fa4", None, return_lse, None, ())
    return torch.ops.attnlang.attention(q, k, v, [], key, op.grad_bits(q, k, v, []))


@pytest.mark.parametrize("return_lse", [False, True])
def test_the_op_runs_fa4s_backward_directly_with_the_same_gradients(fake, monkeypatch, return_lse):
    # the op's forward with gradients hands FA4's backward over (attnlang.plan.give_direct_backward): no
    # autograd graph of flash_attn_func, FA4's _flash_attn_bwd called by the op's backward itself
    monkeypatch.setattr(fa4, "unsupported", lambda q, plan: None)  # a CPU stand-in for the kernel
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, D = 2, 4, 2, 33, 32
    # q / k / v as transposed [B, S, H, D] buffers (a transformers model's layout)
    q = torch.randn(B, S, Hq, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    out, lse = _op_training(CAUSAL, q, k, v, return_lse)
    assert fake.direct == ["fwd"]
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((out, lse) if return_lse else (out,), (q, k, v),
                              (dout, dlse) if return_lse else (dout,))
    assert fake.direct == ["fwd", "bwd"]
    ref, ref_lse = CAUSAL(q, k, v, backend="eager", return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad((ref, ref_lse) if return_lse else (ref,), (q, k, v),
                               (dout, dlse) if return_lse else (dout,))
    for a, b, t in zip(got, want, (q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.stride() == t.stride()  # the inputs' layout: FA4's [B, S, H, D] gradients are not copied


def test_the_op_keeps_the_autograd_graph_where_fa4s_call_is_not_plain(fake, monkeypatch):
    # a guard's fix (here zero-padding of D=48) runs through autograd: the direct handover is not taken
    monkeypatch.setattr(fa4, "unsupported", lambda q, plan: None)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 17, 48, generator=g).requires_grad_() for _ in range(3))
    out, _ = _op_training(CAUSAL, q, k, v, False)
    got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert fake.direct == []
    want = torch.autograd.grad(CAUSAL(q, k, v, backend="eager"), (q, k, v), torch.ones_like(out))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_eager_training_call_frees_its_output_and_saved_tensors(fake, monkeypatch):
    # fa4._FlashTraining's node must not hold its own outputs (a closure over out / lse kept on ctx): that reference
    # cycle runs through the C++ autograd graph, which Python's collector cannot free, so every training step
    # leaked out, lse and the saved q / k / v (H200: one cudaMalloc a step, 10 in 10 steps)
    import gc
    import weakref
    monkeypatch.setattr(fa4, "unsupported", lambda q, plan: None)  # a CPU stand-in for the kernel
    q, k, v = (torch.randn(1, 2, 16, 32).requires_grad_() for _ in range(3))
    refs = []
    for _ in range(3):
        out = CAUSAL(q, k, v, backend="fa4")
        out.sum().backward()
        refs.append(weakref.ref(out._base if out._base is not None else out))  # FA4's own [B, S, H, D] out
        del out
    gc.collect()
    assert fake.direct.count("bwd") == 3  # the _FlashTraining path ran (FA4's _flash_attn_bwd)
    assert all(r() is None for r in refs), "a training call's output outlived it"


def test_an_in_place_write_to_an_aux_tensor_before_the_backward_is_an_error():
    # FA4's backward reads the aux tensors again (score_mod_bwd), often the caller's named tensor itself: written in
    # place between the forward and the backward, the gradients would silently be those of the new values (eager
    # raises autograd's in-place error there; _FlashTraining now saves them for the same check)
    bias = torch.randn(8)
    qt, kt, vt = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))

    def run(a, b, c):
        def backward(out, lse, dout, dlse):
            return torch.ones_like(a), torch.ones_like(b), torch.ones_like(c)
        return a.detach() * 1.0, torch.zeros(1, 2, 8), backward

    out, lse = fa4._FlashTraining.apply(qt, kt, vt, run, (bias,))
    out.sum().backward()  # untouched: fine
    assert qt.grad is not None
    out, lse = fa4._FlashTraining.apply(qt, kt, vt, run, (bias,))
    bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class TiledFlash(FakeFlash):
    """FakeFlash whose _flash_attn_fwd also takes ``tile_mn`` (recorded), as FA4's does."""

    def __init__(self):
        super().__init__()
        self.tiles = []

    def _flash_attn_fwd(self, *args, tile_mn=None, **kwargs):
        self.tiles.append(tile_mn)
        return super()._flash_attn_fwd(*args, **kwargs)


@pytest.fixture
def tiled(monkeypatch):
    f = TiledFlash()
    monkeypatch.setattr(fa4, "_flash", lambda: types.SimpleNamespace(
        flash_attn_func=f.flash_attn_func, _flash_attn_fwd=f._flash_attn_fwd, _flash_attn_bwd=f._flash_attn_bwd))
    monkeypatch.setattr(fa4, "_sm_major", lambda t: 9)  # a Hopper device, as far as the tile choice asks
    return f


@pytest.mark.parametrize("Hq, Hkv, Sq, D, short", [
    (8, 2, 1, 128, True),    # decoding: 1 query x 4 grouped heads = 4 rows of FA4's tile
    (8, 2, 16, 128, True),   # 64 rows: exactly the short tile
    (8, 2, 17, 128, False),  # 68 rows: FA4's own tile
    (4, 4, 64, 64, True),    # no grouping, head dim 64
    (8, 2, 1, 80, False),    # head dim 80: FA4's own tile uses a different P @ V; not measured with a short one
])
def test_few_query_rows_run_the_short_forward_tile(tiled, Hq, Hkv, Sq, D, short):
    with torch.no_grad():
        _run(CAUSAL, 2, Hq, Hkv, Sq, 300, D, grads=False)
    assert tiled.tiles == [fa4._SHORT_Q_TILE if short else None]


def test_short_forward_tile_is_an_option(tiled):
    with torch.no_grad():
        _run(CAUSAL, 2, 8, 2, 1, 300, 128, grads=False, options={"short_q_tile": False})
    assert tiled.tiles == [None]


def test_short_forward_tile_needs_hopper(tiled, monkeypatch):
    monkeypatch.setattr(fa4, "_sm_major", lambda t: 10)
    with torch.no_grad():
        _run(CAUSAL, 2, 8, 2, 1, 300, 128, grads=False)
    assert tiled.tiles == [None]


@pytest.fixture
def modded(monkeypatch):
    """fa4 on the CPU with a score_mod: FA4's forward a stand-in returning zeros (nothing of it is checked here)."""
    from types import SimpleNamespace

    def forward(q, k, v, **kwargs):
        forward.aux.append(kwargs.get("aux_tensors") is not None)  # not the tensors: this list would hold them
        return (torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype), None, None, None, None)
    forward.aux = []
    monkeypatch.setattr(fa4, "_flash", lambda: SimpleNamespace(_flash_attn_fwd=forward))
    monkeypatch.setattr(fa4, "unsupported", lambda q, plan: None)
    monkeypatch.setattr(fa4, "_load", lambda module: SimpleNamespace(score_mod=object(), score_mod_bwd=object()))
    return forward


BIASED = al.compile(score="score + bias[h, q_idx, kv_idx]", mask="q_idx >= kv_idx")


@pytest.mark.parametrize("S, pinned", [(1024, 0), (64, 5)])
def test_a_plan_keeps_only_small_named_tensors_alive(modded, S, pinned):
    # a Variant keeps its recent plans (64), holding their named tensors weakly; fa4's per-plan kernel arguments
    # and replays held them strongly, so a bias made fresh for every inference call stayed alive for the next 63
    # calls (an [H, S, S] bias on the GPU, 63 times over). Now only named tensors of at most 2 MiB per plan are
    # held (here 8 MiB at S=1024, 32 KiB at S=64)
    import gc
    import weakref
    q = torch.randn(1, 2, S, 16, dtype=torch.bfloat16)
    refs = []
    with torch.no_grad():
        for _ in range(5):
            bias = torch.randn(2, S, S)
            refs.append(weakref.ref(bias))
            BIASED(q, q, q, backend="fa4", bias=bias)
            del bias
    gc.collect()
    assert sum(r() is not None for r in refs) == pinned
    assert modded.aux == [True] * 5  # every call got its bias as an aux tensor
