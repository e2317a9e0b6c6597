"""The eager PyTorch backend: the reference every other backend is checked against.

Plain PyTorch on any device, LANGUAGE.md's semantics exactly. Queries are processed in chunks so that at most one
``[B, Hq, chunk, Skv]`` block of scores exists at a time (S = 32768 runs on a 24 GB CPU machine); under autograd
each chunk is recomputed in the backward pass (activation checkpointing), so memory stays at one block there too.
"""

from __future__ import annotations

import math
import torch
from torch.utils.checkpoint import checkpoint

from ..ast import Expr, names_used
from ..errors import AttnLangError
from ..lower_torch import evaluate
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
        out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] float32 (natural log; -inf for rows with no key).
    Raises:
        AttnLangError: the score expression gives NaN or +inf at an allowed position.
    """
    score, mask, lse_shift, scale, tensors = plan.score, plan.mask, plan.lse_shift, plan.scale, plan.tensors
    B, Hq, Sq, _ = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    fd = _compute_dtype(q)
    if chunk_size is None:
        chunk_size = max(1, min(Sq, _SCORE_BUDGET // max(1, B * Hq * Skv)))
    names = list(tensors)
    values = [tensors[n] for n in names]

    def block(start: int, qc: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, *vals):
        bound = dict(zip(names, vals))
        return _block(qc, kk, vv, score, mask, start, scale, fd, bound, Sq, Skv, B, Hq, Hkv)

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *values))
    k, v = k.to(fd), v.to(fd)  # once, not per chunk
    outs, lses = [], []
    for start in range(0, Sq, chunk_size):
        qc = q[:, :, start:start + chunk_size]
        if needs_grad:
            o, l = checkpoint(block, start, qc, k, v, *values, use_reentrant=False)
        else:
            o, l = block(start, qc, k, v, *values)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, dim=2).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    if lse_shift is not None:
        shift = _row_values(lse_shift, B, Hq, Sq, Skv, q.device, fd, tensors)
        lse = lse + shift.to(lse.dtype)
    return out, lse.to(torch.float32)


def _positions(B, Hq, start, rows, Skv, device):
    return {
        "b": torch.arange(B, device=device).view(B, 1, 1, 1),
        "h": torch.arange(Hq, device=device).view(1, Hq, 1, 1),
        "q_idx": torch.arange(start, start + rows, device=device).view(1, 1, rows, 1),
        "kv_idx": torch.arange(Skv, device=device).view(1, 1, 1, Skv),
    }


def _row_values(expr, B, Hq, Sq, Skv, device, fd, tensors):
    names = _positions(B, Hq, 0, Sq, 1, device)
    names.update(q_len=torch.tensor(Sq, device=device), kv_len=torch.tensor(Skv, device=device))
    val = evaluate(expr, names, tensors, fd, device)
    return val.to(fd).expand(B, Hq, Sq, 1)[..., 0]


def _raise_bad_score(s3: torch.Tensor, start: int):
    bad = torch.isnan(s3) | (s3 == math.inf)
    b, h, i, j = (int(x) for x in bad.nonzero()[0])
    raise AttnLangError(f"the score expression gives {float(s3[b, h, i, j])} at b={b}, h={h}, q_idx={start + i}, "
                        f"kv_idx={j}, an allowed position; scores must be finite or -inf")


def _block(qc, k, v, score_expr, mask_expr, start, scale, fd, tensors, Sq, Skv, B, Hq, Hkv):
    rows = qc.shape[2]
    group = Hq // Hkv
    # [B, Hkv, group, rows, D] @ [B, Hkv, 1, D, Skv]: GQA without copying k and v per query head
    qg = qc.to(fd).reshape(B, Hkv, group, rows, qc.shape[-1])
    s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).reshape(B, Hq, rows, Skv) * scale
    names = _positions(B, Hq, start, rows, Skv, qc.device)
    names.update(score=s, q_len=torch.tensor(Sq, device=qc.device), kv_len=torch.tensor(Skv, device=qc.device))
    used_s = names_used(score_expr)
    used_m = names_used(mask_expr)
    s2 = evaluate(score_expr, {n: t for n, t in names.items() if n in used_s}, tensors, fd, qc.device)
    s2 = s2.to(fd).expand(B, Hq, rows, Skv)
    allowed = evaluate(mask_expr, {n: t for n, t in names.items() if n in used_m}, tensors, fd, qc.device)
    s3 = torch.where(allowed, s2, torch.tensor(-math.inf, dtype=fd, device=qc.device))
    m = s3.amax(dim=-1, keepdim=True)
    # amax propagates NaN and +inf, so one small reduction tells whether any allowed score is bad
    if not bool(torch.isfinite(m).logical_or(m == -math.inf).all()):
        _raise_bad_score(s3, start)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s3 - m_safe)
    total = p.sum(dim=-1, keepdim=True)
    empty = total == 0
    total_safe = torch.where(empty, torch.ones_like(total), total)
    pv = torch.matmul(p.reshape(B, Hkv, group, rows, Skv), v.unsqueeze(2)).reshape(B, Hq, rows, -1)
    out = pv / total_safe
    lse = torch.where(empty, torch.full_like(total, -math.inf), m_safe + torch.log(total_safe))
    return out, lse[..., 0]
