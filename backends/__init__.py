"""Backends: one module each (``eager``, ``flex``, ``fa4``), each with one entry point
``attention(q, k, v, plan) -> (out, lse)``; ``run`` dispatches, and ``select`` says which one "auto" picks."""

from __future__ import annotations

import importlib

from ..errors import AttnLangError
from ..plan import CallPlan

__all__ = ["run", "select", "NAMES"]

NAMES = ("eager", "flex", "fa4")


def select(q, plan: CallPlan) -> tuple[str, str]:
    """(backend, reason) that ``backend="auto"`` picks for this call: fa4, then flex, on a CUDA device; eager
    on the CPU, where compiled flex is inference-only (no gradients, no lse) and compiles for seconds per variant
    while eager gives the first result sooner."""
    if q.device.type != "cuda":
        return "eager", f"eager on {q.device.type}: fa4 and flex are chosen automatically on CUDA devices only"
    reasons = []
    for name in ("fa4", "flex"):
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:  # a backend whose optional dependency is missing
            reasons.append(f"{name}: {e}")
            continue
        why_not = module.unsupported(q, plan)
        if why_not is None:
            return name, f"{name} runs this call" + (f" ({'; '.join(reasons)})" if reasons else "")
        reasons.append(f"{name}: {why_not}")
    return "eager", "; ".join(reasons) or "eager"


def run(backend: str, q, k, v, plan: CallPlan):
    if backend == "auto":
        backend, _ = select(q, plan)  # select has asked the backend already
    elif backend != "eager":
        why_not = importlib.import_module(f"{__name__}.{backend}").unsupported(q, plan)
        if why_not is not None:
            raise AttnLangError(f"backend {backend!r} cannot run this call: {why_not}")
    return importlib.import_module(f"{__name__}.{backend}").attention(q, k, v, plan)
