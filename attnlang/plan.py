"""CallPlan: everything a backend needs for one call, checked and bound; backends take nothing else."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .ast import Expr
from .check import Checked
from .errors import AttnLangError

__all__ = ["CallPlan", "WeakTensors", "request_direct_backward", "direct_backward_requested", "give_direct_backward",
           "take_direct_backward"]


@dataclass(frozen=True, eq=False)
class CallPlan:
    """One checked call of a variant.

    score, mask: the simplified expressions, fully typed for this call's tensor dtypes.
    lse_shift: a per-row term the simplifier dropped from the score (None if none); backends add it to lse.
    scale: multiplies q·k before the score expression.
    tensors: the named tensors the simplified expressions (and lse_shift) read, on q's device.
    key: the variant's canonical (score, mask, lse shift[, sink][, normalize]) text: what the backends' caches are
        keyed on.
    checked: the variant's checked expressions before simplification: ``checked.sources`` and
        ``checked.score.span`` place error carets, ``checked.tensors`` (name -> number of indices) is what
        ``attnlang.sparsity.mask_block_sparsity`` checks tensors against.
    q_len, kv_len, batch, q_heads, kv_heads: this call's sizes.
    options: backend options (``kernel_options``); return_lse: whether the caller wants lse (backends may skip it).
    value_ranges: name -> attnlang.intervals.Interval of every built-in name and named tensor for this call (what
        the call checks proved bounds with; backends use it to pick narrower int types).
    sink: the simplified sink expression, bound and typed for this call (LANGUAGE.md: the logit of one extra key
        per row; it reads no ``kv_idx`` or ``score``), or None. When lse_shift drops a row term c from the score,
        this sink is already ``sink - c``. Backends run it through ``attnlang.denominator``.
    normalize: False: out is the softmax's numerator alone (sigmoid attention); see ``attnlang.denominator``.
    memo: what backends derive from this plan alone (plus the call facts they key it with), e.g. ``unsupported()``'s
        answer and FA4's kernel arguments: a warm call reuses its plan (``Variant._warm_plan``) and with it these.
    """

    score: Expr
    mask: Expr
    lse_shift: Expr | None
    scale: float
    tensors: Mapping[str, torch.Tensor]
    key: tuple[str, ...]
    checked: Checked = field(repr=False)
    q_len: int
    kv_len: int
    batch: int
    q_heads: int
    kv_heads: int
    options: Mapping[str, object] = field(default_factory=dict)
    return_lse: bool = True
    value_ranges: Mapping[str, object] = field(default_factory=dict)
    sink: Expr | None = None
    normalize: bool = True
    memo: dict = field(default_factory=dict, repr=False)


class WeakTensors(Mapping):
    """A CallPlan's named tensors (name -> tensor), held weakly. A Variant keeps its recent plans for reuse
    (``Variant._warm_plan``), and a plan holding its call's tensors kept them alive after the caller dropped them:
    the recent calls' named tensors of every variant (a per-step bias or mask; through a tensor with a grad_fn,
    the graph that made it). A plan is only reused by a call passing these very tensors, alive."""

    __slots__ = ("_refs",)

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._refs = {n: weakref.ref(t) for n, t in tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._refs[name]()
        if t is None:
            raise self._freed(name)
        return t

    def _freed(self, name=None) -> AttnLangError:
        if name is None:
            name = next(n for n, r in self._refs.items() if r() is None)
        return AttnLangError(f"the named tensor {name!r} of this call was freed while its call plan was in use")

    def __iter__(self):
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, name) -> bool:
        return name in self._refs

    def alive(self) -> bool:
        """Whether every tensor is still alive (a plan with a freed one can never be reused)."""
        return all(r() is not None for r in self._refs.values())

    def items(self):
        return list(zip(self._refs, self.values()))

    def values(self):
        out = [r() for r in self._refs.values()]
        for t in out:
            if t is None:
                raise self._freed()
        return out

    def __repr__(self) -> str:
        return f"WeakTensors({ {n: r() for n, r in self._refs.items()}!r})"  # None: freed


# ----- a backward handed over without autograd (attnlang.op <-> a backend; per thread) -----
# attnlang.op runs a forward with gradients and later its backward, each as one opaque op. A backend that can
# run its own backward directly (fa4: FA4's _flash_attn_bwd on what its forward saved) hands it over instead of
# recording an autograd graph that the op's backward would replay with a second, reentrant autograd engine run
# (~0.2 ms of host time a call on the H200; a compiled training step is host-bound there: issue 18).
_DIRECT = threading.local()
_REQUESTED = object()


def request_direct_backward() -> None:
    """attnlang.op, before the backend's forward of a call whose gradients go to q, k and v only."""
    _DIRECT.slot = _REQUESTED


def direct_backward_requested() -> bool:
    """Whether the running call may hand its backward over (``give_direct_backward``) instead of building an
    autograd graph. Only the first asking backend gets True: the request is taken by the handover."""
    return getattr(_DIRECT, "slot", None) is _REQUESTED


def give_direct_backward(backward: Callable) -> None:
    """The backend's backward for the call that ``direct_backward_requested``: ``backward(grad_out, grad_lse)``
    with grad_out [B, Hq, Sq, Dv] in out's dtype and grad_lse [B, Hq, Sq] float32 or None (the caller does not see
    lse) -> (dq, dk, dv) shaped as q, k, v. The out / lse the backend returns are then plain tensors (no graph)."""
    _DIRECT.slot = backward


def take_direct_backward() -> Callable | None:
    """attnlang.op, after the forward: the handed-over backward, or None (the backend built an autograd graph);
    clears the request either way."""
    slot = getattr(_DIRECT, "slot", None)
    _DIRECT.slot = None
    return None if slot is _REQUESTED else slot
