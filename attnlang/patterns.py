"""Recognition of the patterns kernels implement natively: causal masks (top-left or bottom-right aligned),
sliding windows, tanh soft-capping, and packed documents (``doc[q_idx] == doc[kv_idx]``, which varlen kernels
run as separate sequences), read off a simplified variant so a backend can use its own flags.

Works on the simplifier's normal forms but does not depend on one spelling: mask conjuncts are read as integer
affine forms of (q_idx, kv_idx, q_len, kv_len), so ``q_idx >= kv_idx``, ``kv_idx <= q_idx`` and
``q_idx - kv_idx >= 0`` are the same constraint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ast import MIRRORED, Binary, Call, Const, DType, Expr, Index, Op, Var, walk
from .simplify import affine_difference

__all__ = ["NativeLowering", "recognize", "Documents", "documents"]

_ALIGNMENTS = ("top_left", "bottom_right")


@dataclass(frozen=True)
class NativeLowering:
    """What of a variant a kernel's own flags can express.

    causal: None, "top_left" (q_idx >= kv_idx) or "bottom_right" (kv_idx <= q_idx + kv_len - q_len).
    window_left, window_right: allowed iff q_idx' - window_left <= kv_idx <= q_idx' + window_right, with q_idx' the
        query position on the diagonal of ``alignment`` (q_idx for top-left, q_idx + kv_len - q_len for
        bottom-right); None means unbounded on that side. Both None when there is no window.
    alignment: alignment of the causal / window constraints (None when there are none).
    softcap: c when the score applies c * tanh(score / c) first (None otherwise).
    residual_score: the score with the soft-capped score written as ``score`` (``score`` itself if nothing else).
    residual_mask: the conjuncts of the mask the flags above do not cover (None if they cover all of it).
    """

    causal: str | None = None
    window_left: int | None = None
    window_right: int | None = None
    alignment: str | None = None
    softcap: float | None = None
    residual_score: Expr | None = None
    residual_mask: Expr | None = None

    @property
    def has_window(self) -> bool:
        return self.window_left is not None or self.window_right is not None

    def description(self) -> str:
        """One line per recognised pattern, for explain()."""
        from .printer import to_source
        lines = []
        if self.causal:
            lines.append(f"causal ({self.causal.replace('_', '-')})")
        if self.has_window:
            left = "unbounded" if self.window_left is None else str(self.window_left)
            right = "unbounded" if self.window_right is None else str(self.window_right)
            lines.append(f"sliding window ({(self.alignment or 'top_left').replace('_', '-')}): left {left}, "
                         f"right {right}")
        if self.softcap is not None:
            lines.append(f"tanh soft-capping at {self.softcap:g}")
        if self.residual_score is not None and not (isinstance(self.residual_score, Var)
                                                    and self.residual_score.name == "score"):
            lines.append(f"score left for a score_mod: {to_source(self.residual_score)}")
        if self.residual_mask is not None:
            lines.append(f"mask left for a mask_mod: {to_source(self.residual_mask)}")
        if not lines:
            return "no native pattern"
        return "; ".join(lines)


def _conjuncts(mask: Expr) -> list[Expr]:
    out, stack = [], [mask]
    while stack:
        n = stack.pop()
        if isinstance(n, Binary) and n.op is Op.AND:
            stack.append(n.right)
            stack.append(n.left)
        else:
            out.append(n)
    return out


def _diagonal_bound(node: Expr):
    """A conjunct constraining d = q_idx - kv_idx (relative to one alignment's diagonal) to a half-line or a point:
    (alignment, lo, hi) with lo <= d <= hi (None for unbounded), or None."""
    if not (isinstance(node, Binary) and node.op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ)):
        return None
    diff = affine_difference(node.left, node.right)
    if diff is None:
        return None
    coef, c = diff   # sum(coef * name) + c  OP  0
    qk = coef.pop("q_idx", 0), coef.pop("kv_idx", 0)
    lens = coef.pop("kv_len", 0), coef.pop("q_len", 0)
    if any(coef.values()) or qk not in ((1, -1), (-1, 1)):
        return None
    op = node.op
    if qk == (-1, 1):  # multiply by -1 so the form is q_idx - kv_idx + ...
        lens, c = (-lens[0], -lens[1]), -c
        op = MIRRORED[op]
    # q - kv + a*kv_len + b*q_len + c OP 0; the bottom-right diagonal is d' = q - kv + kv_len - q_len
    if lens == (0, 0):
        alignment = "top_left"
    elif lens == (1, -1):
        alignment = "bottom_right"
    else:
        return None
    t = -c  # d OP t
    if op is Op.GE:
        return alignment, t, None
    if op is Op.GT:
        return alignment, t + 1, None
    if op is Op.LE:
        return alignment, None, t
    if op is Op.LT:
        return alignment, None, t - 1
    return alignment, t, t


def _softcap(score: Expr):
    """(cap, residual score) when ``cap * tanh(score / cap)`` (or ``tanh(score / cap) * cap``, or
    ``tanh(score * (1 / cap)) * cap`` folded) is the only use of ``score``."""
    uses = [n for n in walk(score) if isinstance(n, Var) and n.name == "score"]
    if len(uses) != 1:
        return None
    for node in walk(score):
        cap = _softcap_node(node)
        if cap is not None:
            residual = _replace(score, node, Var("score", node.span, DType.FLOAT))
            return cap, residual
    return None


def _const_value(x: Expr):
    if isinstance(x, Const) and x.dtype in (DType.INT, DType.FLOAT):
        v = float(x.value)
        return v if math.isfinite(v) and v > 0 else None
    return None


def _softcap_node(node: Expr):
    if not (isinstance(node, Binary) and node.op is Op.MUL):
        return None
    for outer, inner in ((node.left, node.right), (node.right, node.left)):
        cap = _const_value(outer)
        if cap is None or not (isinstance(inner, Call) and inner.func == "tanh"):
            continue
        arg = inner.args[0]
        if not isinstance(arg, Binary):
            continue
        if arg.op is Op.TRUEDIV and isinstance(arg.left, Var) and arg.left.name == "score" \
                and _const_value(arg.right) == cap:
            return cap
        if arg.op is Op.MUL:
            for s, k in ((arg.left, arg.right), (arg.right, arg.left)):
                kv = _const_value(k)
                if isinstance(s, Var) and s.name == "score" and kv is not None and \
                        math.isclose(kv * cap, 1.0, rel_tol=1e-12):
                    return cap
    return None


def _replace(root: Expr, target: Expr, new: Expr) -> Expr:
    """``root`` with the node ``target`` (by identity) replaced by ``new``; iterative."""
    from .ast import children, with_children
    done: dict[int, Expr] = {}
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node is target:
            done[id(node)] = new
            continue
        kids = children(node)
        if kids and not expanded:
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
            continue
        new_kids = tuple(done[id(k)] for k in kids)
        done[id(node)] = node if all(a is b for a, b in zip(new_kids, kids)) else with_children(node, new_kids)
    return done[id(root)]


def _and_all(parts: list[Expr]) -> Expr | None:
    out = None
    for p in parts:
        out = p if out is None else Binary(Op.AND, out, p, None, DType.BOOL)
    return out


def recognize(score: Expr, mask: Expr) -> NativeLowering:
    """Read the native patterns off a (simplified) score and mask.

    The causal / window flags cover the mask's conjuncts that bound q_idx - kv_idx around one alignment's diagonal
    (the first alignment met wins; conjuncts of another alignment stay in residual_mask). A window needs
    non-negative sizes; causal is reported when the right size is 0.
    """
    parts = [] if isinstance(mask, Const) and mask.value is True else _conjuncts(mask)
    lo = hi = None
    alignment = None
    covered: list[int] = []
    for i, part in enumerate(parts):
        got = _diagonal_bound(part)
        if got is None:
            continue
        al, plo, phi = got
        if alignment is not None and al != alignment:
            continue
        new_lo = plo if lo is None else (lo if plo is None else max(lo, plo))
        new_hi = phi if hi is None else (hi if phi is None else min(hi, phi))
        # window sizes: right = -lo, left = hi; both must stay >= 0 for a kernel flag
        if (new_lo is not None and new_lo > 0) or (new_hi is not None and new_hi < 0):
            continue
        lo, hi, alignment = new_lo, new_hi, al
        covered.append(i)
    residual = [p for i, p in enumerate(parts) if i not in covered]
    causal = window_left = window_right = None
    if alignment is not None:
        window_right = None if lo is None else -lo
        window_left = hi
        if window_right == 0:
            causal = alignment
            if window_left is None:
                window_right = None  # plain causal: no window
    got = _softcap(score)
    softcap, residual_score = (got if got is not None else (None, score))
    if isinstance(mask, Const) and mask.value is True:
        residual_mask = None
    else:
        residual_mask = _and_all(residual)
    return NativeLowering(causal=causal, window_left=window_left, window_right=window_right,
                          alignment=alignment, softcap=softcap, residual_score=residual_score,
                          residual_mask=residual_mask)


@dataclass(frozen=True)
class Documents:
    """A mask that is (or is and-ed with) equality of one integer tensor at q_idx and kv_idx: packed documents.

    tensor: the tensor's name (``doc`` in ``doc[q_idx] == doc[kv_idx]``).
    batched: True for ``doc[b, q_idx] == doc[b, kv_idx]`` (one row of ids per batch), False for a 1-D tensor
        shared by every batch.
    rest: the mask's other conjuncts and-ed together (``Const(True)`` when the equality is the whole mask).

    Where each id occupies one contiguous run of positions (sorted ids, checked on the tensor at call time), the
    pairs the equality allows are exactly the (q, kv) pairs inside one run: a varlen kernel's sequences
    (FlashAttention's ``cu_seqlens``), with ``rest`` evaluated at the global positions.
    """

    tensor: str
    batched: bool
    rest: Expr

    def description(self) -> str:
        """One line for explain()."""
        from .printer import to_source
        read = f"{self.tensor}[b, q_idx] == {self.tensor}[b, kv_idx]" if self.batched else \
            f"{self.tensor}[q_idx] == {self.tensor}[kv_idx]"
        rest = "" if isinstance(self.rest, Const) and self.rest.value is True else \
            f"; within a document: {to_source(self.rest)}"
        return f"packed documents ({read}){rest}"


def _is_var(node: Expr, name: str) -> bool:
    return isinstance(node, Var) and node.name == name


def _document_read(node: Expr):
    """(tensor, batched) when ``node`` is doc[q_idx] == doc[kv_idx] (either order) or its batched form."""
    if not (isinstance(node, Binary) and node.op is Op.EQ):
        return None
    a, b = node.left, node.right
    if not (isinstance(a, Index) and isinstance(b, Index) and a.tensor == b.tensor):
        return None
    if any(x.dtype not in (None, DType.INT, DType.BOOL, DType.UNKNOWN) for x in (a, b)):
        return None  # float ids: equality of floats is not a run structure we rely on
    if len(a.indices) != len(b.indices) or len(a.indices) not in (1, 2):
        return None
    batched = len(a.indices) == 2
    if batched and not (_is_var(a.indices[0], "b") and _is_var(b.indices[0], "b")):
        return None
    pos_a, pos_b = a.indices[-1], b.indices[-1]
    if (_is_var(pos_a, "q_idx") and _is_var(pos_b, "kv_idx")) or (_is_var(pos_a, "kv_idx") and _is_var(pos_b, "q_idx")):
        return a.tensor, batched
    return None


def documents(mask: Expr) -> Documents | None:
    """The packed-documents reading of a (simplified) mask, or None when no conjunct is a document equality.

    The first conjunct of the form ``t[q_idx] == t[kv_idx]`` / ``t[b, q_idx] == t[b, kv_idx]`` (either side
    first) is the documents tensor; every other conjunct, including further equalities, goes to ``rest``. Float
    tensors are not read as documents.
    """
    if isinstance(mask, Const):
        return None
    parts = _conjuncts(mask)
    for i, part in enumerate(parts):
        got = _document_read(part)
        if got is None:
            continue
        rest = _and_all(parts[:i] + parts[i + 1:])
        return Documents(tensor=got[0], batched=got[1], rest=rest if rest is not None else Const(True, DType.BOOL))
    return None
