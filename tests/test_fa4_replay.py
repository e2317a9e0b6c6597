"""attnlang.backends.fa4_replay on the CPU, with a stand-in for flash_attn.cute's interface whose "compiled
kernels" live in compile caches as FA4's do: a warm signature is recorded, checked against FA4's own call, then
replayed without FA4's Python; calls that are more than allocations and launches stay on FA4's own call."""

import types
from typing import NamedTuple

import pytest
import torch
from test_fa4_guards import assert_matches_eager

from attnlang.backends.fa4_replay import Replay, record


class AuxData(NamedTuple):
    tensors: tuple | list | None = None
    scalars: tuple | None = None


class Kernel:
    """A compiled attention kernel: writes out [B, S, H, D] and lse [B, H, S]; adds 1 to a scratch buffer it
    expects zeroed (a replay that skipped the zeroing gives other results)."""

    def __init__(self, shift=0.0):
        self.calls = 0
        self.shift = shift

    def __call__(self, q, k, v, out, lse, scale, aux, scratch):
        self.calls += 1
        s = scale * q.transpose(1, 2).double() @ k.transpose(1, 2).double().transpose(-1, -2)
        if aux.tensors:
            s = s + aux.tensors[0].double().view(1, -1, 1, 1)
        out.copy_((torch.softmax(s, -1) @ v.transpose(1, 2).double()).transpose(1, 2) + scratch.sum() + self.shift)
        lse.copy_(torch.logsumexp(s, -1))
        scratch.add_(1.0)
        if self.shift:
            self.shift += 1.0  # a kernel whose results change from call to call: the check must catch it


def fake_interface(host_op=None, foreign=None, shift=0.0):
    fa = types.ModuleType("fake_flash_interface")
    fa.host_calls = 0

    def _flash_attn_fwd(q, k, v, softmax_scale, aux_tensors=None):
        fa.host_calls += 1
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        scratch = torch.zeros(4) if foreign is None else foreign
        if host_op is not None:
            lse = host_op(lse)
        key = (q.dtype, q.shape[-1])
        if key not in _flash_attn_fwd.compile_cache:
            _flash_attn_fwd.compile_cache[key] = Kernel(shift)
        _flash_attn_fwd.compile_cache[key](q.detach(), k.detach(), v.detach(), out, lse.transpose(-1, -2)
                                           .transpose(-1, -2), softmax_scale, AuxData(aux_tensors, None), scratch)
        return out, lse, None, None, None

    _flash_attn_fwd.compile_cache = {}
    fa._flash_attn_fwd = _flash_attn_fwd
    return fa


def _inputs(seed, B=2, S=5, H=3, D=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, S, H, D, generator=g) for _ in range(3))


def _calls(fa, replay, n, aux=None):
    got = []
    for i in range(n):
        q, k, v = _inputs(i)
        got.append((replay(lambda q=q, k=k, v=v: fa._flash_attn_fwd(q, k, v, 0.5, aux), (q, k, v), (aux,), (fa,)),
                    _own(q, k, v, aux)))
    return got


def _own(q, k, v, aux):
    """What FA4's own call gives, from a fresh stand-in (its kernel counted nowhere)."""
    return fake_interface()._flash_attn_fwd(q, k, v, 0.5, aux)


@pytest.mark.parametrize("aux", [None, [torch.tensor([0.5, -1.0, 2.0])]])
def test_a_warm_signature_replays_the_recorded_launches(aux):
    fa = fake_interface()
    replay = Replay(exact=True)
    got = _calls(fa, replay, 7, aux)
    assert replay.state == "replay" and replay.why is None
    assert fa.host_calls == 3  # warm, record, check; then no more of FA4's Python
    kernel = next(iter(fa._flash_attn_fwd.compile_cache.values()))
    assert kernel.calls == 3 + 1 + 4  # the check ran the program beside FA4's call
    for (out, lse, *rest), (want_out, want_lse, *_) in got:
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
        assert rest == [None, None, None]


def test_a_host_computation_keeps_fa4s_own_call():
    fa = fake_interface(host_op=lambda lse: lse * 1.0)
    replay = Replay(exact=True)
    _calls(fa, replay, 5)
    assert replay.state == "own" and "mul" in replay.why
    assert fa.host_calls == 5


def test_a_tensor_from_elsewhere_keeps_fa4s_own_call():
    fa = fake_interface(foreign=torch.zeros(4))
    q, k, v = _inputs(0)
    _, program, why = record(lambda: fa._flash_attn_fwd(q, k, v, 0.5), (q, k, v), (), (fa,))
    assert program is None and "did not allocate" in why


def test_results_that_differ_from_fa4s_call_keep_fa4s_own_call():
    fa = fake_interface(shift=1.0)
    replay = Replay(exact=True)
    _calls(fa, replay, 5)
    assert replay.state == "own" and "other results" in replay.why


def test_inputs_sharing_a_storage_are_not_recorded():
    fa = fake_interface()
    q, k, v = _inputs(0)
    kv = torch.stack([k, v])
    _, program, why = record(lambda: fa._flash_attn_fwd(q, kv[0], kv[1], 0.5), (q, kv[0], kv[1]), (), (fa,))
    assert program is None and "share" in why


def test_recording_restores_the_compile_caches():
    fa = fake_interface()
    cache = fa._flash_attn_fwd.compile_cache
    q, k, v = _inputs(0)
    record(lambda: fa._flash_attn_fwd(q, k, v, 0.5), (q, k, v), (), (fa,))
    assert fa._flash_attn_fwd.compile_cache is cache


# ----- through the fa4 backend and the op (direct backward), with kernels in compile caches -----

def _attend(q, k, v, scale, left, right):
    """Reference math on [B, S, H, D] views (window (None, 0): bottom-right causal)."""
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = scale * qh @ kh.transpose(-1, -2)
    if right is not None:
        Sq, Skv = s.shape[-2:]
        allowed = torch.arange(Skv)[None, :] <= torch.arange(Sq)[:, None] + (Skv - Sq)
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def fake_fa4_interface():
    fa = types.ModuleType("fake_flash_interface")
    fa.host_calls = {"fwd": 0, "bwd": 0}

    def fwd_kernel(q, k, v, out, lse, scale, left, right):
        s = _attend(q, k, v, scale, left, right)
        out.copy_((torch.softmax(s, -1) @ v.transpose(1, 2).double().repeat_interleave(
            q.shape[2] // k.shape[2], 1)).transpose(1, 2))
        if lse is not None:
            lse.copy_(torch.logsumexp(s, -1))

    def bwd_kernel(q, k, v, dout, dlse, dq, dk, dv, scale, left, right, scratch):
        assert float(scratch.abs().sum()) == 0.0
        qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            s = _attend(qq, kk, vv, scale, left, right)
            o = (torch.softmax(s, -1) @ vv.transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], 1))
            outs, gouts = [o.transpose(1, 2)], [dout.double()]
            if dlse is not None:
                outs.append(torch.logsumexp(s, -1))
                gouts.append(dlse.double())
            grads = torch.autograd.grad(outs, (qq, kk, vv), gouts, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (qq, kk, vv))]
        for dst, g in zip((dq, dk, dv), grads):
            dst.copy_(g)
        scratch.add_(1.0)

    def _flash_attn_fwd(q, k, v, softmax_scale, causal, softcap, window_size_left, window_size_right, score_mod,
                        mask_mod, aux_tensors, block_sparse_tensors, return_lse):
        fa.host_calls["fwd"] += 1
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32) if return_lse else None
        cache = _flash_attn_fwd.compile_cache
        cache.setdefault("fwd", fwd_kernel)
        cache["fwd"](q.detach(), k.detach(), v.detach(), out, lse, softmax_scale, window_size_left,
                     window_size_right)
        return out, lse, None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, softcap, window_size_left,
                        window_size_right, score_mod, score_mod_bwd, mask_mod, aux_tensors, block_sparse_tensors,
                        dlse):
        fa.host_calls["bwd"] += 1
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scratch = torch.zeros(3)
        _flash_attn_bwd.compile_cache.setdefault("bwd", bwd_kernel)
        _flash_attn_bwd.compile_cache["bwd"](q, k, v, dout, dlse, dq, dk, dv, softmax_scale, window_size_left,
                                             window_size_right, scratch)
        return dq, dk, dv

    _flash_attn_fwd.compile_cache, _flash_attn_bwd.compile_cache = {}, {}
    fa._flash_attn_fwd, fa._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    fa.flash_attn_func = None  # never called: inference and direct training use the two functions above
    return fa


@pytest.fixture
def fake_fa4(monkeypatch):
    from attnlang.backends import fa4
    fa = fake_fa4_interface()
    monkeypatch.setattr(fa4, "_flash", lambda: fa)
    monkeypatch.setattr(fa4, "unsupported", lambda q, plan: None)  # a CPU stand-in for the kernel
    return fa


def _qkv(seed, grads):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 9, 4, 32, generator=g).transpose(1, 2).requires_grad_(grads)
    k, v = (torch.randn(2, 9, 2, 32, generator=g).transpose(1, 2).requires_grad_(grads) for _ in range(2))
    return q, k, v, g


@pytest.mark.parametrize("path", ["op", "eager"])
@pytest.mark.parametrize("grads", [True, False], ids=["fwd_bwd", "fwd"])
def test_the_fa4_backend_replays_warm_calls(fake_fa4, grads, path):
    import attnlang as al
    from attnlang import op
    fa = fake_fa4
    variant = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")
    variant._warm.clear()  # variants are interned: an earlier test's plans replay another stand-in's kernels
    for call in range(6):
        q, k, v, g = _qkv(call, grads)
        with torch.set_grad_enabled(grads):
            if path == "op":  # what a compiled graph runs: the op's backward calls FA4's backward itself
                out, lse = op.call(variant, q, k, v, None, "fa4", True, None, {})
            else:  # an eager call: its own autograd node (fa4._FlashTraining)
                out, lse = variant(q, k, v, backend="fa4", return_lse=True)
        assert_matches_eager(variant, q, k, v, out, lse, grads, g)
    assert fa.host_calls["fwd"] == 3  # warm, record, check: the other three calls replayed
    assert fa.host_calls["bwd"] == (3 if grads else 0)


def test_a_pending_check_keeps_fa4s_own_call_until_its_result_arrives():
    fa = fake_interface()
    replay = Replay(exact=True)
    _calls(fa, replay, 2)  # warm, record
    assert replay.state == "check"

    class Event:
        done = False

        def query(self):
            return self.done

    event = Event()
    replay.state, replay._event, replay._flag = "pending", event, torch.tensor(False)
    host = fa.host_calls
    _calls(fa, replay, 2)
    assert fa.host_calls == host + 2 and replay.state == "pending"  # not replayed before the check is in
    event.done = True
    _calls(fa, replay, 2)
    assert fa.host_calls == host + 2 and replay.state == "replay"


def test_an_eager_training_call_gives_lse_gradients_and_checks_versions(fake_fa4):
    import attnlang as al
    variant = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")
    variant._warm.clear()
    q, k, v, g = _qkv(0, True)
    out, lse = variant(q, k, v, backend="fa4", return_lse=True)
    ref, ref_lse = variant(q, k, v, backend="eager", return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k, v))  # only lse used: the node gets no out gradient
    want = torch.autograd.grad(ref_lse.sum(), (q, k, v), allow_unused=True)  # lse does not depend on v
    for a, b, t in zip(got, want, (q, k, v)):
        torch.testing.assert_close(a, torch.zeros_like(t) if b is None else b, rtol=1e-5, atol=1e-5)
    out = variant(q, k, v, backend="fa4")
    with torch.no_grad():
        q.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = variant(q, k, v, backend="fa4")
    with torch.no_grad():
        out.mul_(2.0)  # FA4's backward reads out
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_second_derivative_of_an_eager_training_call_is_an_error_not_zeros(fake_fa4):
    # FA4's backward is no differentiable function of its inputs: with create_graph=True the gradients would come
    # back without a graph (a second derivative of 0, silently); once_differentiable makes it an error
    import attnlang as al
    variant = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")
    variant._warm.clear()
    q, k, v, _ = _qkv(0, True)
    out = variant(q, k, v, backend="fa4")
    (dq,) = torch.autograd.grad((out ** 2).sum(), (q,), create_graph=True)  # the gradient of out needs a graph
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (dq.square().sum() + q.sum()).backward()  # a gradient penalty: its second-order part would be dropped


def test_a_program_that_fails_in_its_check_keeps_fa4s_own_call():
    fa = fake_interface()
    replay = Replay(exact=True)
    _calls(fa, replay, 2)  # warm, record
    def refusing(*a):
        raise TypeError("argument 3 has the wrong type")
    object.__setattr__(replay.program, "_steps", ((refusing, *replay.program._steps[0][1:]),))
    got = _calls(fa, replay, 3)
    assert replay.state == "own" and "wrong type" in replay.why
    for (out, lse, *_), (want_out, want_lse, *_) in got:
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def _module_with(host):
    """A stand-in interface whose _flash_attn_fwd is ``host(q, k, v, cache)``, its kernels in a compile cache."""
    fa = types.ModuleType("fake_flash_interface")
    fa.host_calls = 0

    def _flash_attn_fwd(q, k, v):
        fa.host_calls += 1
        return host(q, k, v, _flash_attn_fwd.compile_cache)

    _flash_attn_fwd.compile_cache = {}
    fa._flash_attn_fwd = _flash_attn_fwd
    return fa


def _twice_replayed(fa, n=6):
    replay = Replay(exact=True)
    got = []
    for i in range(n):
        q, k, v = _inputs(i)
        got.append((replay(lambda q=q, k=k, v=v: fa._flash_attn_fwd(q, k, v), (q, k, v), (), (fa,)), (q, k, v)))
    return replay, got


def test_views_of_inputs_and_tuples_of_buffers_are_rebuilt():
    def kernel(q_half, pair, k, v):
        out, scratch = pair
        scratch.copy_(q_half.sum(-1))  # [B, S, H] from the first half of q's last dim
        out.copy_(scratch[..., None] * k + v)

    def host(q, k, v, cache):
        out = torch.empty_like(v)
        scratch = torch.empty(q.shape[:-1])
        cache.setdefault("k", kernel)
        cache["k"](q.detach()[..., : q.shape[-1] // 2], (out, scratch), k.detach(), v.detach())
        return out, scratch

    fa = _module_with(host)
    replay, got = _twice_replayed(fa)
    assert replay.state == "replay" and fa.host_calls == 3
    for (out, scratch), (q, k, v) in got:
        want = q[..., : q.shape[-1] // 2].sum(-1)
        torch.testing.assert_close(scratch, want)
        torch.testing.assert_close(out, want[..., None] * k + v)


def test_a_fill_after_a_kernel_read_keeps_fa4s_own_call():
    def kernel(q, acc):
        acc.add_(q.sum())

    def host(q, k, v, cache):
        acc = torch.zeros(1)
        cache.setdefault("k", kernel)
        cache["k"](q.detach(), acc)
        acc.zero_()  # the buffer was read by a kernel already: no fresh buffer's fill
        cache["k"](q.detach(), acc)
        return acc, None

    fa = _module_with(host)
    replay, _ = _twice_replayed(fa, 4)
    assert replay.state == "own" and "not a fresh, unused buffer" in replay.why
