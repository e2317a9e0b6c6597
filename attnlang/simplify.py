"""The simplifier: rewrite rules as data, applied to a fixed point (placeholder: identity until the rule
tables land)."""

from __future__ import annotations

from dataclasses import dataclass

from .ast import Expr

__all__ = ["Simplified", "simplify_variant"]


@dataclass(frozen=True)
class Simplified:
    """score, mask: the rewritten expressions; lse_shift: a per-row term dropped from the score by softmax shift
    invariance (None if none), which backends add back to lse; trace: one line per rule that fired."""

    score: Expr
    mask: Expr
    lse_shift: Expr | None = None
    trace: tuple[str, ...] = ()


def simplify_variant(score: Expr, mask: Expr) -> Simplified:
    return Simplified(score, mask)
