"""The softmax's denominator (LANGUAGE.md): the sink and ``normalize=False``, applied to a kernel's (out, lse).

Every backend computes ``out`` and ``lse`` of the softmax over the allowed keys; ``finish`` turns them into the
variant's result, one piece of code for eager, flex and fa4 (attention-gym and FlexAttention users renormalise
with lse by hand in the same way):

- sink (one extra key per row with logit ``sink``, carrying no value; gpt-oss's learned per-head sinks):
  ``lse' = logaddexp(lse, sink)`` and ``out' = out * exp(lse - lse')``. A row with no allowed key (out 0,
  lse -inf) gives out 0 and lse = sink; sink = -inf changes nothing.
- ``normalize=False`` (sigmoid attention): ``out' = out * exp(lse)``, the numerator ``sum exp(s'') V`` whether or
  not the kernel's lse included the sink; lse is returned unchanged (with the sink).

Both are plain torch operations on [B, Hq, Sq] rows, so autograd takes gradients through lse to q, k, v (the
backend's lse must be differentiable) and through the sink expression to the tensors it reads. FA4 can also
take a per-head sink into the kernel itself (``learnable_sink``): ``per_head`` says when, ``head_values`` gives
its [Hq] tensor, and ``finish(..., sink_in_kernel=True)`` then skips the sink's correction.
"""

from __future__ import annotations

import math

import torch

from .ast import Call, Const, DType, Index, Var, walk
from .errors import AttnLangError
from .intervals import TOP, bounds
from .lower_torch import evaluate, positions, row_values
from .memo import IdentityMemo
from .plan import CallPlan

__all__ = ["finish", "sink_values", "head_values", "per_head", "sink_finite", "lse_float32", "bad_score_hint",
           "check_numerator"]

_FINITE = IdentityMemo()  # bound sink expressions and value ranges whose sink is provably finite


def bad_score_hint(score) -> str:
    """The end of the error for a NaN score at an allowed position when the score takes a log (or a square root),
    most often of a weight that went negative: exp space (LANGUAGE.md: weights exp(score), with normalize=False
    too) cannot carry a negative weight, e.g. GELU activation attention's. "" when the score takes neither."""
    funcs = {n.func for n in walk(score) if isinstance(n, Call) and n.func in ("log", "log2", "sqrt")}
    if not funcs:
        return ""
    what = " or ".join(w for w, fs in (("a log", {"log", "log2"}), ("a square root", {"sqrt"})) if funcs & fs)
    return (f"; {what} of a negative number? Every weight is exp(score) >= 0, with normalize=False too, so a negative "
            "weight (GELU activation attention's, say) cannot be expressed: write log(f(score) + offset) with "
            "normalize=False and subtract offset * (the sum of v over the allowed keys), as attention-gym's "
            "activation attention and examples/activation.py do")


def raw_score_hint(value: float, dtype) -> str:
    """The end of that error where the scaled dot product itself, scale * q·k, is already NaN or infinite there:
    the expression is not at fault, q / k / scale are."""
    return (f"; there the scaled dot product scale * q·k is itself {value} (before the score expression): q or k "
            f"holds NaN or inf, or their dot product times scale overflows {str(dtype).replace('torch.', '')}")


_FLOAT32_MAX = torch.finfo(torch.float32).max


def sink_finite(plan: CallPlan) -> bool:
    """Whether interval analysis proves the sink finite for this call (no -inf, +inf or NaN anywhere), also in
    float32, where the backends compute it for 16- and 32-bit inputs (a sink bounded by 1e40 is inf there)."""
    def compute():
        r = bounds(plan.sink, plan.value_ranges)
        if not (math.isfinite(r.lo) and math.isfinite(r.hi) and max(abs(r.lo), abs(r.hi)) <= _FLOAT32_MAX):
            return False
        # clamp / min / max give finite bounds, but a NaN passes through them (clamp(t[h] * 0.0, -3.0, 3.0) with
        # -inf in t): a float part that can be NaN (TOP) leaves the sink unproven
        return not any(n.dtype is DType.FLOAT and bounds(n, plan.value_ranges) == TOP for n in walk(plan.sink))
    return _FINITE.get((plan.sink,), tuple(plan.value_ranges.items()), compute)


def _check(plan: CallPlan, values: torch.Tensor) -> None:
    """NaN or +inf sinks are errors, with the caret under the sink expression (-inf is allowed: no sink)."""
    if sink_finite(plan):
        return
    bad = torch.isnan(values) | (values == math.inf)
    if bool(bad.any()):
        where = [int(x) for x in bad.nonzero()[0]]
        at = ", ".join(f"{n}={i}" for n, i in zip(("b", "h", "q_idx") if len(where) == 3 else ("h",), where))
        message = (f"the sink expression gives {float(values[tuple(where)])} at {at}; a sink must be finite or "
                   f"-inf (no sink)")
        checked = plan.checked
        if checked.sink is None:
            raise AttnLangError(message)
        raise AttnLangError.at(message, checked.sources["sink"], checked.sink.span, where="sink")


def sink_values(plan: CallPlan, device, float_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sink of every row: float_dtype [B, Hq, Sq], differentiable in the tensors the sink reads.

    Raises:
        AttnLangError: the sink is NaN or +inf somewhere.
    """
    values = row_values(plan.sink, plan.batch, plan.q_heads, plan.q_len, plan.kv_len, plan.tensors, float_dtype,
                        device)
    _check(plan, values)
    return values


def per_head(plan: CallPlan) -> bool:
    """Whether the sink is one value per query head (it reads neither ``b`` nor ``q_idx``): FA4's learnable_sink."""
    return plan.sink is not None and not ({"b", "q_idx"} & _grid_names(plan.sink))


def head_values(plan: CallPlan, device, float_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sink of each query head for a ``per_head`` sink: a contiguous float_dtype [Hq] tensor, differentiable in
    the tensors the sink reads (FA4's ``learnable_sink``, whose backward returns its gradient).

    ``t[h]`` of a contiguous [Hq] float32 / bfloat16 / float16 tensor is that tensor itself (no kernel launched per
    call); a constant sink is one cached tensor per value, size and device."""
    direct = _direct_read(plan, float_dtype)
    if direct is not None:
        return direct
    if isinstance(plan.sink, Const):
        key = (float(plan.sink.value), plan.q_heads, str(device), float_dtype)
        got = _CONSTANTS.get(key)
        if got is None:
            got = torch.full((plan.q_heads,), float(plan.sink.value), dtype=float_dtype, device=device)
            _check(plan, got)
            _CONSTANTS[key] = got
            while len(_CONSTANTS) > 64:
                _CONSTANTS.pop(next(iter(_CONSTANTS)))
        return got
    names = positions(1, plan.q_heads, 0, 1, 1, device)
    names.update(q_len=torch.tensor(plan.q_len, device=device), kv_len=torch.tensor(plan.kv_len, device=device))
    val = evaluate(plan.sink, names, plan.tensors, float_dtype, device)
    val = val.to(float_dtype).expand(1, plan.q_heads, 1, 1).reshape(plan.q_heads).contiguous()
    _check(plan, val)
    return val


_CONSTANTS: dict = {}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # FA4's learnable_sink dtypes


def _direct_read(plan: CallPlan, float_dtype: torch.dtype):
    """The tensor ``t`` itself when the sink is ``t[h]`` over a contiguous [Hq] tensor the kernel can read."""
    sink = plan.sink
    if not (isinstance(sink, Index) and len(sink.indices) == 1 and isinstance(sink.indices[0], Var)
            and sink.indices[0].name == "h"):
        return None
    t = plan.tensors[sink.tensor]
    if tuple(t.shape) != (plan.q_heads,) or not t.is_contiguous():
        return None
    if t.dtype not in _KERNEL_DTYPES or (float_dtype == torch.float64) != (t.dtype == torch.float64):
        return None
    if not sink_finite(plan):
        _check(plan, t.detach())
    return t


def _grid_names(expr) -> set[str]:
    return {n.name for n in walk(expr) if isinstance(n, Var)}


def finish(out: torch.Tensor, lse: torch.Tensor, plan: CallPlan, float_dtype: torch.dtype = torch.float32,
           sink_in_kernel: bool = False, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The variant's (out, lse) from a kernel's softmax over the allowed keys.

    Args:
        out: [B, Hq, Sq, Dv], the normalised output (0 for rows with no allowed key).
        lse: [B, Hq, Sq], natural log, -inf for rows with no allowed key (before ``plan.lse_shift``).
        plan: the call; its ``sink`` and ``normalize`` say what to do.
        float_dtype: the dtype the correction is computed in and returned in (float32, float64 for float64 q).
        sink_in_kernel: the kernel's out and lse already include the sink (FA4's learnable_sink).
        out_dtype: the dtype the caller returns out in (q's): with normalize=False, out must fit it.
    Returns:
        (out, lse) in float_dtype, or the inputs unchanged when the plan has no sink and normalizes.
    Raises:
        AttnLangError: the sink is NaN or +inf somewhere; with normalize=False, out passes out_dtype's range.
    """
    if (plan.sink is None or sink_in_kernel) and plan.normalize:
        return out, lse
    out, lse = out.to(float_dtype), lse.to(float_dtype)
    if not plan.normalize:
        # exp(lse) * out is the numerator whether or not lse counts the sink; exp(-inf) = 0 for empty rows
        normalized, out = out, out * torch.exp(lse).unsqueeze(-1)
        check_numerator(out, lse, out_dtype or float_dtype, normalized)
    if plan.sink is not None and not sink_in_kernel:
        sink = sink_values(plan, out.device, float_dtype)
        zero = torch.zeros((), dtype=float_dtype, device=out.device)
        # rows with neither a key nor a sink keep lse -inf and out 0; the where()s keep their gradients finite
        none = (lse == -math.inf) & (sink == -math.inf)
        a, b = torch.where(none, zero, lse), torch.where(none, zero, sink)
        both = torch.logaddexp(a, b)
        if plan.normalize:
            factor = torch.where(none, zero, torch.exp(a - both))
            out = out * factor.unsqueeze(-1)
        lse = torch.where(none, torch.full((), -math.inf, dtype=float_dtype, device=out.device), both)
    return out, lse


def check_numerator(out: torch.Tensor, lse: torch.Tensor, float_dtype: torch.dtype,
                    normalized: torch.Tensor | None = None) -> None:
    """normalize=False: the numerator sum exp(s'') V past float_dtype's range is inf (or NaN where V is 0: inf * 0;
    or inf once cast to float16): an error, as a score past the range is, instead of a silent inf / NaN output.
    ``normalized``: the output before the scale by exp(lse); where it is not finite already, v is (the error says
    so instead of blaming the range)."""
    x = out.detach()
    bad = ~torch.isfinite(x) | (x.abs() > torch.finfo(float_dtype).max)
    if out.is_cuda and torch.cuda.is_current_stream_capturing():
        torch._assert_async(~bad.any(), "attnlang: with normalize=False the output sum exp(score) * v leaves the "
                                        "float range")
        return
    if not bool(bad.any()):
        return
    b, h, i = (int(x) for x in bad.nonzero()[0][:3])
    if normalized is not None and not bool(torch.isfinite(normalized[b, h, i]).all()):
        raise AttnLangError(f"the output is not finite in row b={b}, h={h}, q_idx={i} before normalize=False's scale "
                            f"by exp(lse) (lse {float(lse[b, h, i]):.6g}): v holds a NaN or an infinite value (a "
                            f"weight, even 0, times NaN or inf is NaN); attention of a non-finite v is not defined")
    raise AttnLangError(f"with normalize=False the output sum over allowed keys of exp(score) * v passes "
                        f"{float_dtype}'s range (largest {torch.finfo(float_dtype).max:.4g}) in row b={b}, h={h}, "
                        f"q_idx={i}, where lse is {float(lse[b, h, i]):.6g}; subtract a constant from the score "
                        f"(the output scales by exp of it)")


def lse_float32(lse: torch.Tensor) -> torch.Tensor:
    """lse as every backend returns it: float32, and float64 when it was computed in float64 (float64 inputs,
    API.md), so a float64 pipeline that undoes the softmax keeps its digits (and an lse past float32's range, as
    with ``scale=1e200``, stays finite instead of becoming inf)."""
    if lse.dtype == torch.float64:
        return lse
    return lse.to(torch.float32)
