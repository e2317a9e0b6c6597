"""attnlang.backends.fa4_replay on the CPU, with a stand-in for flash_attn.cute's interface whose "compiled
kernels" live in compile caches as FA4's do: a warm signature is recorded, checked against FA4's own call, then
replayed without FA4's Python; calls that are more than allocations and launches stay on FA4's own call."""

import types
from typing import NamedTuple

import pytest
import torch

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
        got.append((replay(lambda: fa._flash_attn_fwd(q, k, v, 0.5, aux), (q, k, v), (aux,), (fa,)),
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
    replay = Replay(exact=True)
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
