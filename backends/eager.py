"""The eager PyTorch backend: the reference every other backend is checked against.

Plain PyTorch on any device, LANGUAGE.md's semantics exactly. Queries are processed in chunks so that at most one
``[B, Hq, chunk, Skv]`` block of scores exists at a time (S = 32768 runs on a 24 GB CPU machine); under autograd
each chunk is recomputed in the backward pass (activation checkpointing), so memory stays at one block there too.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

from ..ast import Binary, Call, Const, DType, Index, Op, names_used, walk
from ..denominator import bad_score_hint, finish, lse_float32, raw_score_hint
from ..errors import AttnLangError
from ..lower_torch import evaluate, positions, row_values
from ..plan import CallPlan

__all__ = ["attention"]

_SCORE_BUDGET = 1 << 22  # elements of one [B, Hq, chunk, Skv] block


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan,
              chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for one checked call.

    Args:
        q: [B, Hq, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv]; float16, bfloat16, float32 or float64.
        plan: the bound, simplified expressions, scale and named tensors (``attnlang.plan.CallPlan``).
        chunk_size: query rows per block (default: as many as fit the budget).
    Returns:
        out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] float32, float64 when q is float64 (natural log; -inf
        for rows with no key, the sink there when the plan has one). A sink and normalize=False come from
        ``attnlang.denominator.finish``.
    Raises:
        AttnLangError: the score expression gives NaN or +inf at an allowed position; the sink is NaN or +inf.
    """
    score, mask, lse_shift, scale, tensors = plan.score, plan.mask, plan.lse_shift, plan.scale, plan.tensors
    B, Hq, Sq, _ = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    fd = _compute_dtype(q)
    if chunk_size is None:
        chunk_size = max(1, min(Sq, _SCORE_BUDGET // max(1, B * Hq * Skv)))
    names = list(tensors)
    values = [tensors[n] for n in names]
    checked = getattr(plan, "checked", None)
    source = (checked.sources["score"], checked.score.span) if checked is not None else None  # for error carets

    def block(start: int, qc: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, *vals):
        bound = dict(zip(names, vals))
        return _block(qc, kk, vv, score, mask, start, scale, fd, bound, Sq, Skv, B, Hq, Hkv, guard, source,
                      v_finite, overflow)

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *values))
    guard = needs_grad and _may_leak_nan(score, tensors)
    k, v = k.to(fd), v.to(fd)  # once, not per chunk
    # else keys of weight 0 must not spread v's NaN / inf; while a CUDA graph is captured no value can be read
    # (a sync), so the product that handles non-finite v always runs then
    if v.is_cuda and torch.cuda.is_current_stream_capturing():
        v_finite = False
    else:
        with torch.no_grad():
            v_finite = bool(torch.isfinite(v).all())
    overflow = "score" in names_used(score) and may_overflow(q, k, scale, fd)
    outs, lses = [], []
    for start in range(0, Sq, chunk_size):
        qc = q[:, :, start:start + chunk_size]
        if needs_grad:
            o, l = checkpoint(block, start, qc, k, v, *values, use_reentrant=False)
        else:
            o, l = block(start, qc, k, v, *values)
        outs.append(o)
        lses.append(l)
    out, lse = finish(torch.cat(outs, dim=2), torch.cat(lses, dim=2), plan, fd, out_dtype=q.dtype)
    out = out.to(q.dtype)
    if lse_shift is not None:
        shift = row_values(lse_shift, B, Hq, Sq, Skv, tensors, fd, q.device)
        lse = lse + shift.to(lse.dtype)
    return out, lse_float32(lse)  # float64 stays float64 (API.md)


def may_overflow(q: torch.Tensor, k: torch.Tensor, scale: float, fd: torch.dtype) -> bool:
    """Whether scale * q·k can leave ``fd``'s range for these inputs: |scale| * D * max|q| * max|k| past it
    (from the dtypes' ranges alone when that already rules it out, as for float16 at usual scales; else from the
    values, one host read). False while a CUDA graph is captured (no value can be read then)."""
    limit = torch.finfo(fd).max
    head_dim = q.shape[-1]
    by_dtype = abs(scale) * head_dim * torch.finfo(q.dtype).max * torch.finfo(k.dtype).max
    if by_dtype < limit:
        return False
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    with torch.no_grad():
        qmax, kmax = torch.stack((q.detach().abs().amax().double(), k.detach().abs().amax().double())).tolist()
    return not abs(scale) * head_dim * qmax * kmax < limit  # NaN / inf in q or k count as possible


def _raise_overflow(bad: torch.Tensor, start: int, fd, source: tuple | None = None):
    b, h, i, j = (int(x) for x in bad.nonzero()[0])
    message = (f"the scaled dot product scale * q·k is -inf at b={b}, h={h}, q_idx={start + i}, kv_idx={j}, an "
               f"allowed position, and the score expression keeps it -inf, which would mask that key silently: q "
               f"or k holds inf, or scale * q·k overflows {str(fd).replace('torch.', '')} (scale q / k or scale= "
               f"down, or compute in float64)")
    if source is None:
        raise AttnLangError(message)
    raise AttnLangError.at(message, *source, where="score")


def _raise_bad_score(s3: torch.Tensor, start: int, source: tuple | None = None, score_expr=None, raw=None):
    bad = torch.isnan(s3) | (s3 == math.inf)
    b, h, i, j = (int(x) for x in bad.nonzero()[0])
    value = float(s3[b, h, i, j])
    message = (f"the score expression gives {value} at b={b}, h={h}, q_idx={start + i}, "
               f"kv_idx={j}, an allowed position; scores must be finite or -inf")
    given = None if raw is None else float(raw.expand(s3.shape)[b, h, i, j])
    if given is not None and not math.isfinite(given):
        message += raw_score_hint(given, raw.dtype)
    elif math.isnan(value) and score_expr is not None:
        message += bad_score_hint(score_expr)
    if source is None:
        raise AttnLangError(message)
    raise AttnLangError.at(message, *source, where="score")  # the caret underlines the score expression


# Functions whose derivative stays finite wherever their value is finite; anything else (log, sqrt, exp, ...)
# can meet a masked position's zero gradient with an infinite derivative there.
_TAME_CALLS = frozenset({"tanh", "sigmoid", "abs", "min", "max", "clamp", "where", "float", "int", "floor", "ceil",
                         "sign"})


def _nonzero_const(node) -> bool:
    return isinstance(node, Const) and node.value != 0 and math.isfinite(node.value)


def _may_leak_nan(score_expr, tensors) -> bool:
    """Whether the backward pass through the score expression, evaluated on the whole grid, could give NaN at a
    masked or -inf position (then only the kept positions are evaluated with autograd)."""
    for node in walk(score_expr):
        if isinstance(node, Call) and node.func not in _TAME_CALLS:
            return True
        if isinstance(node, Binary) and node.dtype is DType.FLOAT:
            if any(isinstance(x, Const) and not math.isfinite(x.value) for x in (node.left, node.right)):
                return True  # x * inf: an infinite local derivative
            if node.op in (Op.TRUEDIV, Op.FLOORDIV, Op.MOD) and not _nonzero_const(node.right):
                return True
            if node.op is Op.POW and not (isinstance(node.right, Const) and node.right.dtype is DType.INT
                                          and node.right.value >= 0):
                return True
        if isinstance(node, Index) and node.dtype is DType.FLOAT:
            with torch.no_grad():
                if not bool(torch.isfinite(tensors[node.tensor]).all()):
                    return True
    return False


def _differentiable_scores(score_expr, names, tensors, fd, s3, full, device):
    """The masked scores ``s3`` again, with autograd, evaluating the score expression only where s3 > -inf.

    Evaluating it at masked (or -inf) positions too would let their zero gradient meet an infinite local
    derivative there (log(0), x * inf) and turn into NaN in the backward pass; the unchosen branches of a where()
    and operands of a min / max / clamp likewise (``guard_branches``, no host sync).
    """
    keep = s3 > -math.inf
    if bool(keep.all()):
        return evaluate(score_expr, names, tensors, fd, device, guard_branches=True).to(fd).expand(full)
    picked = {n: t.expand(full)[keep] for n, t in names.items()}
    values = evaluate(score_expr, picked, tensors, fd, device, guard_branches=True).to(fd).expand(int(keep.sum()))
    return torch.full(full, -math.inf, dtype=fd, device=device).masked_scatter(keep, values)


def _weights_times_v(p, v, B, Hq, Hkv, rows, v_finite=True):
    """out = p @ v per (b, h) with GQA's head grouping: [B, Hq, rows, Skv] @ [B, Hkv, Skv, Dv].

    LANGUAGE.md sums over the allowed keys only, so a key of weight exactly 0 (a masked pair, a -inf score)
    contributes nothing even where its row of v is NaN or infinite (a cache's unwritten tail, say), where the
    plain product gives 0 * NaN = NaN. When v is not all finite (``v_finite`` False), the product is taken with
    those entries 0 and each output element gets NaN / +inf / -inf only from the non-finite entries its keys of
    nonzero weight meet (NaN from a NaN, or from both +inf and -inf; else the infinity's sign)."""
    group = Hq // Hkv
    skv = p.shape[-1]

    def mm(w, x):
        return torch.matmul(w.reshape(B, Hkv, group, rows, skv), x.unsqueeze(2)).reshape(B, Hq, rows, -1)

    if v_finite:
        return mm(p, v)
    finite = torch.isfinite(v)
    out = mm(p, torch.where(finite, v, torch.zeros((), dtype=v.dtype, device=v.device)))
    with torch.no_grad():
        vd = v.detach()
        weighted = (p.detach() > 0).to(v.dtype)
        nan = mm(weighted, torch.isnan(vd).to(v.dtype)) > 0
        pos = mm(weighted, (vd == math.inf).to(v.dtype)) > 0
        neg = mm(weighted, (vd == -math.inf).to(v.dtype)) > 0
    full = functools.partial(torch.full, (), dtype=out.dtype, device=out.device)
    out = torch.where(pos, full(math.inf), out)
    out = torch.where(neg, full(-math.inf), out)
    return torch.where(nan | (pos & neg), full(math.nan), out)


def _block(qc, k, v, score_expr, mask_expr, start, scale, fd, tensors, Sq, Skv, B, Hq, Hkv, guard=True,
           score_source=None, v_finite=True, overflow=False):
    rows = qc.shape[2]
    group = Hq // Hkv
    # [B, Hkv, group, rows, D] @ [B, Hkv, 1, D, Skv]: GQA without copying k and v per query head
    qg = qc.to(fd).reshape(B, Hkv, group, rows, qc.shape[-1])
    s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).reshape(B, Hq, rows, Skv) * scale
    names = positions(B, Hq, start, rows, Skv, qc.device)
    names.update(score=s, q_len=torch.tensor(Sq, device=qc.device), kv_len=torch.tensor(Skv, device=qc.device))
    used_s = names_used(score_expr)
    used_m = names_used(mask_expr)
    full = (B, Hq, rows, Skv)
    score_names = {n: t for n, t in names.items() if n in used_s}
    allowed = evaluate(mask_expr, {n: t for n, t in names.items() if n in used_m}, tensors, fd, qc.device)
    grad = torch.is_grad_enabled() and (s.requires_grad or any(t.requires_grad for t in tensors.values()))
    with torch.no_grad():
        s2 = evaluate(score_expr, score_names, tensors, fd, qc.device).to(fd).expand(full)
        s3 = torch.where(allowed, s2, torch.tensor(-math.inf, dtype=fd, device=qc.device))
        # the softmax does not depend on m, so it carries no gradient
        m = s3.amax(dim=-1, keepdim=True)
    # amax propagates NaN and +inf, so one small reduction tells whether any allowed score is bad
    if not bool(torch.isfinite(m).logical_or(m == -math.inf).all()):
        _raise_bad_score(s3, start, score_source, score_expr, s)
    if overflow:  # a -inf that only overflow made, kept by the expression, is no mask the user wrote
        with torch.no_grad():
            bad = (s3 == -math.inf) & allowed & (s.detach() == -math.inf)
        if bool(bad.any()):
            _raise_overflow(bad, start, fd, score_source)
    if grad and not guard:
        s2 = evaluate(score_expr, score_names, tensors, fd, qc.device).to(fd).expand(full)
        s3 = torch.where(allowed, s2, torch.tensor(-math.inf, dtype=fd, device=qc.device))
    elif grad:
        s3 = _differentiable_scores(score_expr, score_names, tensors, fd, s3, full, qc.device)
    if grad and s.requires_grad and "score" not in used_s:
        # a score that does not read score still depends on q and k (with zero gradient), as flex's tie does: out
        # keeps a grad_fn, and autograd.grad(out, q) gives zeros instead of an unused-input error; a select that
        # never picks s (not s * 0.0: inf * 0 is NaN) sends exactly 0
        never = torch.zeros((), dtype=torch.bool, device=qc.device)
        s3 = s3 + torch.where(never, s, torch.zeros((), dtype=fd, device=qc.device))
    empty = m == -math.inf  # rows with no allowed key
    any_empty = bool(empty.any())
    if any_empty:  # give such rows finite scores, so softmax and its gradient stay finite; zeroed below
        s3 = torch.where(empty, torch.zeros((), dtype=fd, device=qc.device), s3)
    p = torch.softmax(s3, dim=-1)  # one fused pass
    lse = torch.logsumexp(s3, dim=-1, keepdim=True)
    out = _weights_times_v(p, v, B, Hq, Hkv, rows, v_finite)
    if any_empty:
        zero = torch.zeros((), dtype=fd, device=qc.device)
        out = torch.where(empty, zero, out)
        lse = torch.where(empty, torch.full((), -math.inf, dtype=fd, device=qc.device), lse)
    return out, lse[..., 0]
