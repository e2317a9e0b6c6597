"""Backends: one module each (``eager``, ``flex``, ``fa4``), each with one entry point
``attention(q, k, v, plan) -> (out, lse)``; ``run`` dispatches, and ``select`` says which one "auto" picks.

``backend="auto"`` tries, in order, fa4, flex and eager on a CUDA device (eager alone elsewhere), skipping each
backend whose ``unsupported()`` declines. When the kernel of the backend it picked fails to compile or launch (any
exception but an AttnLangError about the user's input, or a ``KernelFailure``), it warns once, naming the failure,
and runs the next one: every backend computes the same attention, so the result stays the same. The choice is
cached per call signature (the variant's bound expressions, shapes, dtypes, device, requires_grad flags, named
tensors by identity and version, options, grad mode), so a warm ``auto`` call asks no backend anything."""

from __future__ import annotations

import importlib
import sys
import warnings

import torch

from ..errors import AttnLangError
from ..memo import MEMO
from ..plan import CallPlan

__all__ = ["run", "select", "NAMES", "KernelFailure", "clear_choices", "option_problem"]

NAMES = ("eager", "flex", "fa4")
_CUDA_ORDER = ("fa4", "flex", "eager")
_CHOICES_MAX = 1024
_UNASKED = object()


class KernelFailure(AttnLangError):
    """A backend's kernel failed to compile or launch on a call its ``unsupported()`` accepted: a fault of the
    kernel, not of the user's input, so ``backend="auto"`` moves on to the next backend."""


def _order(q) -> tuple[str, ...]:
    """The backends "auto" tries, best first: fa4, then flex, then eager on CUDA; eager on the CPU, where compiled
    flex is inference-only (no gradients, no lse) and compiles for seconds per variant while eager gives the first
    result sooner."""
    return _CUDA_ORDER if q.device.type == "cuda" else ("eager",)


def _module(name: str):
    full = f"{__name__}.{name}"
    # sys.modules first (a dict lookup; what is there is what import_module would return): ~2 us less a call
    got = sys.modules.get(full)
    return got if got is not None else importlib.import_module(full)


class _Choice:
    """What "auto" knows about one call signature: the backends still to try (``order[pos:]``), why the earlier
    ones were skipped, and the one that ran last time (None until one is found)."""

    __slots__ = ("order", "pos", "reasons", "name")

    def __init__(self, order):
        self.order, self.pos, self.reasons, self.name = order, 0, [], None

    def next_runnable(self, q, plan: CallPlan):
        """Advance to the next backend whose ``unsupported()`` accepts the call; its name (eager always does)."""
        while self.pos < len(self.order):
            name = self.order[self.pos]
            if name == "eager":
                self.name = name
                return name
            try:
                why_not = _module(name).unsupported(q, plan)
            except ImportError as e:  # a backend whose optional dependency is missing
                why_not = str(e)
            if why_not is None:
                self.name = name
                return name
            self.reasons.append(f"{name}: {why_not}")
            self.pos += 1
        raise AssertionError("eager ends every order")  # pragma: no cover

    def reason(self) -> str:
        if self.name == "eager" and not self.reasons:
            return "eager on the CPU: fa4 and flex are chosen automatically on CUDA devices only" \
                if self.order == ("eager",) else "eager"
        why = "; ".join(self.reasons)
        if self.name == "eager":
            return why
        return f"{self.name} runs this call" + (f" ({why})" if why else "")


_CHOICES: dict = {}


def _signature(q, k, v, plan: CallPlan):
    """(objects held by identity, hashable key) of everything ``unsupported()`` may look at."""
    tensors = tuple((n, tuple(t.shape), t.dtype, t.requires_grad, MEMO.token(t))
                    for n, t in sorted(plan.tensors.items()))
    try:
        options = tuple(sorted(plan.options.items()))
        hash(options)
    except TypeError:  # unhashable option values: their repr
        options = tuple(sorted((str(a), repr(b)) for a, b in plan.options.items()))
    key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, v.dtype, q.device,
           q.requires_grad, k.requires_grad, v.requires_grad, torch.is_grad_enabled(),
           torch.is_inference_mode_enabled(), tensors, options, plan.return_lse, plan.lse_shift is None,
           plan.scale)
    return (plan.score, plan.mask, plan.lse_shift), (plan.key, key)


def _choice(q, k, v, plan: CallPlan) -> _Choice:
    objs, key = _signature(q, k, v, plan)
    full = (tuple(map(id, objs)), key)
    hit = _CHOICES.get(full)
    if hit is not None and all(a is b for a, b in zip(hit[0], objs)):
        return hit[1]
    choice = _Choice(_order(q))
    choice.next_runnable(q, plan)
    if len(_CHOICES) >= _CHOICES_MAX:
        _CHOICES.clear()
    _CHOICES[full] = (objs, choice)  # the objects are kept alive with the entry: their ids are not reused
    return choice


def clear_choices() -> None:
    """Forget every cached "auto" choice (tests; after installing or removing a backend's dependency)."""
    _CHOICES.clear()


def select(q, plan: CallPlan, k=None, v=None) -> tuple[str, str]:
    """(backend, reason) that ``backend="auto"`` picks for this call (k / v default to q's shapes)."""
    choice = _choice(q, q if k is None else k, q if v is None else v, plan)
    return choice.name, choice.reason()


def _is_kernel_failure(e: Exception) -> bool:
    """Whether ``e`` is the kernel's fault (compile or launch), not the user's: AttnLangErrors are the user's
    (a NaN score, a bad option) unless raised as KernelFailure; running out of device memory is no kernel fault
    either (the next backend needs as much or more)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(e, KernelFailure) or not isinstance(e, AttnLangError)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _option_problem(backend: str, options) -> str | None:
    """Unknown kernel_options keys: for a named backend, keys it does not take (eager takes none); for "auto",
    keys no backend takes. None when they are fine."""
    if not options:
        return None
    if backend == "eager":
        return (f"backend 'eager' takes no kernel_options; got {', '.join(map(repr, sorted(map(str, options))))} "
                f"(kernel_options are for 'flex' and 'fa4')")
    if backend != "auto":
        return None  # the backend's unsupported() checks its own keys
    fa4, flex = _module("fa4"), _module("flex")
    unknown = [k for k in options if k not in fa4.OPTIONS and flex.option_problem({k: None}) is not None]
    if unknown:
        return (f"{flex.option_problem({k: None for k in unknown})}; backend 'fa4' takes "
                f"{', '.join(fa4.OPTIONS)}")
    # fa4's values too, as flex's: auto on a machine without FA4 runs another backend, which ignores them
    fa4_only = {k: val for k, val in options.items() if k in fa4.OPTIONS}
    return (fa4._check_options(fa4_only) if fa4_only else None) or flex.value_problem(options)


def option_problem(backend: str, options) -> str | None:
    """What is wrong with ``kernel_options`` for ``backend`` (unknown keys, bad values; a named backend's own
    check), else None: for a call that runs no kernel (an empty one, ``attnlang.variant._empty_call``), whose
    backend is never asked whether it could run it."""
    bad = _option_problem(backend, options)
    if bad is None and options and backend == "flex":
        bad = _module("flex").option_problem(options)
    if bad is None and options and backend == "fa4":
        bad = _module("fa4")._check_options(options)
    return bad


def _call_facts(q, k, v) -> tuple:
    """What a backend's per-plan answers (``plan.memo``) depend on besides the plan: a warm call reuses the last
    call's plan (``Variant._warm_plan``), and with it these answers for the same facts."""
    return (q.dtype, q.device, q.shape, k.shape, v.shape, torch.is_grad_enabled(),  # torch.Size: a tuple
            q.requires_grad, k.requires_grad, v.requires_grad)


def run(backend: str, q, k, v, plan: CallPlan):
    bad = _option_problem(backend, plan.options)
    if bad is not None:
        raise AttnLangError(bad)
    if backend != "auto":
        if backend != "eager":
            asked = ("unsupported", backend) + _call_facts(q, k, v)
            why_not = plan.memo.get(asked, _UNASKED)
            if why_not is _UNASKED:
                why_not = plan.memo[asked] = _module(backend).unsupported(q, plan)
            if why_not is not None:
                raise AttnLangError(f"backend {backend!r} cannot run this call: {why_not}")
        return _module(backend).attention(q, k, v, plan)
    # kept with the plan: _choice's signature costs ~100 us a call on the H200
    asked = ("auto",) + _call_facts(q, k, v)
    choice = plan.memo.get(asked)
    if choice is None:
        choice = plan.memo[asked] = _choice(q, k, v, plan)
    while True:
        name = choice.name
        try:
            return _module(name).attention(q, k, v, plan)
        except Exception as e:
            if name == "eager" or not _is_kernel_failure(e):
                raise
            # the choice is shared by every later call of this signature: the failing backend is not tried again
            choice.reasons.append(f"{name} failed: {_first_line(e)}")
            choice.pos += 1
            nxt = choice.next_runnable(q, plan)
            warnings.warn(f"attnlang: backend {name!r} failed on this call ({_first_line(e)}); backend='auto' "
                          f"runs {nxt!r} instead, which computes the same attention", RuntimeWarning, stacklevel=3)
