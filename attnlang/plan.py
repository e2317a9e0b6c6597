"""CallPlan: everything a backend needs for one call, checked and bound; backends take nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from .ast import Expr
from .check import Checked

__all__ = ["CallPlan"]


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
