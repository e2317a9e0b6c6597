"""backend="auto" on the CPU with stand-in backends: it moves on when a kernel fails (warning once, same result),
lets the user's errors through, and caches its choice per call signature (grad mode, dtype, tensor versions)."""

import sys
import types
import warnings

import pytest
import torch

import attnlang as al
from attnlang import backends
from attnlang.backends import KernelFailure, eager


class Fake:
    """A backend module: ``unsupported`` answers ``decline(q, plan)``; ``attention`` raises ``fail`` or runs eager."""

    def __init__(self, name, fail=None, decline=None):
        self.name, self.fail, self.decline = name, fail, decline
        self.asked = 0
        self.ran = 0

    def module(self):
        mod = types.ModuleType(f"attnlang.backends.{self.name}")

        def unsupported(q, plan):
            self.asked += 1
            return self.decline(q, plan) if self.decline else None

        def attention(q, k, v, plan):
            self.ran += 1
            if self.fail is not None:
                raise self.fail
            return eager.attention(q, k, v, plan)

        mod.unsupported, mod.attention = unsupported, attention
        return mod


@pytest.fixture
def install(monkeypatch):
    backends.clear_choices()

    def put(*fakes):
        for f in fakes:
            monkeypatch.setitem(sys.modules, f"attnlang.backends.{f.name}", f.module())
        monkeypatch.setattr(backends, "_order", lambda q: (*(f.name for f in fakes), "eager"))
        return fakes

    yield put
    backends.clear_choices()


VARIANT = al.compile(score="score + bias[kv_idx]", mask="q_idx >= kv_idx")


def _qkv(dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v


def _bias(dtype=torch.float32):
    return torch.linspace(-1, 1, 9, dtype=dtype)


@pytest.mark.parametrize("error", [RuntimeError("ptxas: out of resource"), KernelFailure("kernel X failed"),
                                   AssertionError("head_dim must be divisible")], ids=["runtime", "kernel", "assert"])
def test_failing_kernel_moves_on_with_one_warning_and_the_same_result(install, error):
    broken, good = install(Fake("broken", fail=error), Fake("good"))
    q, k, v = _qkv()
    bias = _bias()
    ref = VARIANT(q, k, v, backend="eager", bias=bias)
    with pytest.warns(RuntimeWarning, match="backend 'broken' failed") as record:
        out = VARIANT(q, k, v, bias=bias)
    assert str(error).split(":")[0] in str(record[0].message) and "'good'" in str(record[0].message)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert (broken.ran, good.ran) == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither warns nor tries the broken kernel again
        out2 = VARIANT(q, k, v, bias=bias)
    torch.testing.assert_close(out2, ref, rtol=0, atol=0)
    assert (broken.ran, good.ran) == (1, 2)
    name, reason = backends.select(q, VARIANT._plan(q, k, v, None, "auto", False, None, {"bias": bias}))
    assert name == "good" and "broken failed" in reason


def test_every_kernel_failing_ends_on_eager(install):
    install(Fake("a", fail=RuntimeError("a broke")), Fake("b", fail=RuntimeError("b broke")))
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning):
        out = VARIANT(q, k, v, bias=_bias())
    torch.testing.assert_close(out, VARIANT(q, k, v, backend="eager", bias=_bias()), rtol=0, atol=0)


def test_users_errors_are_not_swallowed(install):
    fake, = install(Fake("picky", fail=al.AttnLangError("the score expression gives NaN")))
    q, k, v = _qkv()
    with pytest.raises(al.AttnLangError, match="gives NaN"):
        VARIANT(q, k, v, bias=_bias())
    assert fake.ran == 1


def test_gradients_after_a_fallback(install):
    install(Fake("broken", fail=RuntimeError("no")))
    q, k, v = _qkv(grad=True)
    bias = _bias().requires_grad_(True)
    with pytest.warns(RuntimeWarning):
        VARIANT(q, k, v, bias=bias).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    VARIANT(q, k, v, backend="eager", bias=bias).sum().backward()
    for a, t in zip(grads, (q, k, v, bias)):
        torch.testing.assert_close(a, t.grad, rtol=0, atol=0)


def test_choice_is_cached_per_signature(install):
    fake, = install(Fake("fast"))
    q, k, v = _qkv()
    bias = _bias()
    VARIANT(q, k, v, bias=bias)
    VARIANT(q, k, v, bias=bias)
    VARIANT(q.clone(), k.clone(), v.clone(), bias=bias)  # new q/k/v of the same signature: still a hit
    assert (fake.asked, fake.ran) == (1, 3)
    bias.add_(1.0)  # in place: a new version of a named tensor is a new signature
    VARIANT(q, k, v, bias=bias)
    assert fake.asked == 2
    VARIANT(q[:, :, :5], k, v, bias=bias)  # another shape
    assert fake.asked == 3


def test_grad_mode_and_dtype_change_the_choice(install):
    def decline(q, plan):
        if q.dtype == torch.float64:
            return "no float64"
        if torch.is_grad_enabled() and q.requires_grad:
            return "inference only"
        return None

    fake, = install(Fake("infer", decline=decline))
    q, k, v = _qkv(grad=True)
    bias = _bias()
    plan = VARIANT._plan(q, k, v, None, "auto", False, None, {"bias": bias})
    with torch.no_grad():
        assert backends.select(q, plan, k, v)[0] == "infer"
    assert backends.select(q, plan, k, v) == ("eager", "infer: inference only")
    with torch.no_grad():
        assert backends.select(q, plan, k, v)[0] == "infer"  # a hit: not asked again
    assert fake.asked == 2
    q64, k64, v64 = _qkv(torch.float64)
    plan64 = VARIANT._plan(q64, k64, v64, None, "auto", False, None, {"bias": _bias(torch.float64)})
    with torch.no_grad():
        assert backends.select(q64, plan64, k64, v64)[0] == "eager"
    with torch.no_grad():
        out = VARIANT(q, k, v, bias=bias)
    assert fake.ran == 1 and not out.requires_grad
    VARIANT(q, k, v, bias=bias)  # grad mode: eager, the fake is not run
    assert fake.ran == 1


def test_warm_auto_call_asks_no_backend(monkeypatch):
    # on the CPU "auto" is eager; after the first call, no backend's unsupported() is asked again
    backends.clear_choices()
    from attnlang.backends import fa4, flex
    asked = []
    for mod in (fa4, flex):
        monkeypatch.setattr(mod, "unsupported", lambda q, plan, _m=mod: asked.append(_m) or "no")
    monkeypatch.setattr(backends, "_order", lambda q: ("fa4", "flex", "eager"))
    q, k, v = _qkv()
    VARIANT(q, k, v, bias=_bias())
    assert len(asked) == 2
    VARIANT(q, k, v, bias=_bias())  # a new bias tensor: new identity, asked again
    VARIANT(q, k, v, bias=(b := _bias()))
    n = len(asked)
    for _ in range(3):
        VARIANT(q, k, v, bias=b)
    assert len(asked) == n
    backends.clear_choices()


def test_cpu_auto_is_eager_with_its_reason():
    backends.clear_choices()
    q, k, v = _qkv()
    plan = VARIANT._plan(q, k, v, None, "auto", False, None, {"bias": _bias()})
    name, reason = backends.select(q, plan)
    assert name == "eager" and "CUDA" in reason
