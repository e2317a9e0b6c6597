"""Typed AST -> PyTorch operations, with LANGUAGE.md's exact semantics.

Shared by the eager backend (on broadcast position grids) and the Flex backend (inside score_mod / mask_mod,
where every value is a 0-d tensor). One spelling table, one dispatcher: both backends compute the same function.
Every operand is first converted to the node's own type, so torch's promotion rules never decide a result type.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .ast import Binary, Call, Const, DType, Expr, Index, Op, Unary, Var, walk

__all__ = ["evaluate", "positions", "row_values"]

_INT = torch.int64


def _cast_to(x: torch.Tensor, dtype: DType, float_dtype: torch.dtype, int_dtype: torch.dtype = _INT) -> torch.Tensor:
    if dtype is DType.FLOAT:
        return x if x.dtype == float_dtype else x.to(float_dtype)
    if dtype is DType.INT:
        return x if x.dtype == int_dtype else x.to(int_dtype)
    return x if x.dtype == torch.bool else x.to(torch.bool)


def _join(a: DType, b: DType) -> DType:
    if a is DType.BOOL and b is DType.BOOL:
        return DType.BOOL
    return DType.FLOAT if DType.FLOAT in (a, b) else DType.INT


_ARITH = {
    Op.ADD: torch.add,
    Op.SUB: torch.sub,
    Op.MUL: torch.mul,
    Op.TRUEDIV: torch.true_divide,
    Op.FLOORDIV: lambda a, b: torch.div(a, b, rounding_mode="floor"),  # Python's floor division
    Op.MOD: torch.remainder,                                            # Python's sign: that of the divisor
    Op.POW: torch.pow,
    Op.BITAND: torch.bitwise_and,
    Op.BITOR: torch.bitwise_or,
    Op.XOR: torch.bitwise_xor,
    Op.LSHIFT: torch.bitwise_left_shift,    # the checker keeps shifts in [0, 63] and the result in int64
    Op.RSHIFT: torch.bitwise_right_shift,   # arithmetic: Python's floor toward -inf
}
_COMPARE = {Op.LT: torch.lt, Op.LE: torch.le, Op.GT: torch.gt, Op.GE: torch.ge, Op.EQ: torch.eq, Op.NE: torch.ne}
_LOGIC = {Op.AND: torch.logical_and, Op.OR: torch.logical_or}
_FLOAT_FUNCS = {
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "cos": torch.cos, "sin": torch.sin,
}


# min / max as selects, NaN propagating like torch.minimum / maximum: flex's FLASH code generator (torch 2.11) has no
# 'maximum' / 'minimum', and a select computes the same value everywhere (a NaN operand is chosen, as torch does)
def _maximum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pick_a = a >= b if not a.is_floating_point() else (a >= b) | (a != a)
    return torch.where(pick_a, a, b)


def _minimum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pick_a = a <= b if not a.is_floating_point() else (a <= b) | (a != a)
    return torch.where(pick_a, a, b)


def _pick_left(f: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where ``_maximum`` / ``_minimum`` choose their left operand."""
    pick = a >= b if f == "max" else a <= b
    return pick | (a != a) if a.is_floating_point() else pick


_FINITE_DERIVATIVE = frozenset({"tanh", "sigmoid", "erf", "cos", "sin", "abs", "sign", "floor", "ceil", "float", "int",
                                "where", "min", "max", "clamp"})


def _guard_needed(node: Expr) -> bool:
    """Whether an operand of a select can send an unchosen NaN gradient to a leaf: some local derivative inside it
    can be infinite or NaN (log, sqrt, exp, a division, a fractional power, a non-finite literal, a product of two
    non-constants, one of which may be inf). Otherwise every local derivative is finite and the select's zero
    gradient stays 0 (nested where / min / max guard themselves): no guard, the same graph."""
    for n in walk(node):
        if isinstance(n, Call) and n.func not in _FINITE_DERIVATIVE:
            return True
        if isinstance(n, Const) and n.dtype is DType.FLOAT and not math.isfinite(n.value):
            return True
        if isinstance(n, Binary) and n.dtype is DType.FLOAT:
            if n.op is Op.TRUEDIV:
                return True
            exponent = n.right
            if n.op is Op.POW and not (isinstance(exponent, Const) and exponent.dtype is DType.INT
                                       and exponent.value >= 0):
                return True
            if n.op is Op.MUL and not isinstance(n.left, Const) and not isinstance(n.right, Const):
                return True
    return False


def _constant_zero(node: Binary) -> bool:
    """``x * 0.0``, ``0.0 * x`` or ``x - x``: zero wherever it is finite, whatever x."""
    if node.op is Op.MUL:
        return any(isinstance(x, Const) and x.value == 0 for x in (node.left, node.right))
    return node.op is Op.SUB and node.left == node.right


def evaluate(expr: Expr, names: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
             float_dtype: torch.dtype = torch.float32, device=None, int_dtype: torch.dtype = _INT,
             full_consts: bool = False, pick_branches: bool = False, guard_branches: bool = False) -> torch.Tensor:
    """Evaluate a bound (fully typed) expression.

    Args:
        expr: a typed AST from ``check.bind`` (every node INT, FLOAT or BOOL).
        names: tensors for the built-in names used (``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``, ``q_len``,
            ``kv_len``), mutually broadcastable.
        tensors: the tensors bound by name.
        float_dtype: the dtype of float values (float32, or float64 for a float64 reference).
        device: where constants live (defaults to the device of the first name).
        int_dtype: the dtype of int values: int64 (LANGUAGE.md's ints); int32 only where the caller has proved
            that every int value fits (flex's FLASH kernel stores no int64).
        full_consts: literals as ``torch.full((), value)`` instead of ``torch.tensor(value)``: traced, the latter
            is a lifted constant tensor (get_attr + lift_fresh_copy), the former an op of the graph (flex's TRITON
            mods); the same values either way.
        pick_branches: evaluate each branch of a float ``where`` only where it is chosen (eager, under autograd):
            an unchosen branch's zero gradient times an infinite or NaN local derivative there (``sqrt`` of a
            negative score in ``where(score > 0.0, sqrt(score), score)``) would be NaN. Needs grid names (not the
            0-d values of a flex mod) and costs a host sync per where.
        guard_branches: the same gradients for a traced mod (flex's score_mod, whose backward is the autograd of
            this function): inside each branch of a float ``where``, every float leaf the branch reads (``score``,
            a read of a floating tensor) becomes ``torch.where(pick, x, x.detach())``, pick being the conjunction
            of the enclosing conditions that choose the branch. The forward values are unchanged (x either way);
            the backward sends zero to the leaf wherever the branch is unchosen, so the NaN of ``0 * inf`` made
            inside it never reaches ``score`` or the tensor. The operands of a float ``min`` / ``max`` / ``clamp``
            likewise, each guarded by where the select chooses it (the left operand on a tie, a NaN operand
            wherever it is one), unless the operand is a bare leaf or a constant. No host sync, works on 0-d values
            and grids alike (eager uses it too); an expression without a float ``where`` or such a select evaluates
            exactly as without it.
    Returns:
        a tensor of the broadcast shape of the names used (0-d if none), int_dtype, float_dtype or bool.
    """
    if device is None:
        device = next(iter(names.values())).device if names else None

    def _cast(x, dtype, float_dtype):
        return _cast_to(x, dtype, float_dtype, int_dtype)

    # guard_branches: the condition choosing the branch being evaluated (None: every branch chosen everywhere)
    # plain: evaluating values that carry no gradient (a select's pick, a where's condition): no guards there, so
    # nested selects are evaluated twice per level at most once (not 2 ** depth times, as in a max reduction's tree)
    state = {"pick": None, "plain": False}

    def guarded(x: torch.Tensor) -> torch.Tensor:
        pick = state["pick"]
        return x if pick is None else torch.where(pick, x, x.detach())

    def const(node: Const) -> torch.Tensor:
        dt = {DType.FLOAT: float_dtype, DType.INT: int_dtype, DType.BOOL: torch.bool}[node.dtype]
        if full_consts:
            return torch.full((), node.value, dtype=dt, device=device)
        return torch.tensor(node.value, dtype=dt, device=device)

    def operand(node: Expr, dtype: DType) -> torch.Tensor:
        """``node`` converted to ``dtype``. An int literal that meets a float is made a float literal directly:
        compiled CPU flex cannot lower the int64 constant's conversion inside a mod ("'Tensor' object has no
        attribute 'get_dtype'", torch 2.11-2.13); below 2**24 the value is exact in every float dtype."""
        if isinstance(node, Const) and node.dtype is DType.INT and dtype is DType.FLOAT and abs(node.value) <= 1 << 24:
            return torch.tensor(float(node.value), dtype=float_dtype, device=device)
        return _cast(visit(node), dtype, float_dtype)

    def visit(node: Expr) -> torch.Tensor:
        if isinstance(node, Const):
            return const(node)
        if isinstance(node, Var):
            x = _cast(names[node.name], node.dtype, float_dtype)
            return guarded(x) if names[node.name].is_floating_point() else x
        if isinstance(node, Index):
            idx = tuple(_cast(visit(i), DType.INT, float_dtype) for i in node.indices)
            x = _cast(tensors[node.tensor][idx], node.dtype, float_dtype)
            return guarded(x) if tensors[node.tensor].is_floating_point() else x
        if isinstance(node, Unary):
            x = visit(node.operand)
            return torch.logical_not(x) if node.op is Op.NOT else torch.neg(_cast(x, node.dtype, float_dtype))
        if isinstance(node, Binary):
            if node.op in _LOGIC:
                return _LOGIC[node.op](visit(node.left), visit(node.right))
            common = _join(node.left.dtype, node.right.dtype) if node.op in _COMPARE else node.dtype
            a, b = operand(node.left, common), operand(node.right, common)
            if node.dtype is DType.FLOAT and _constant_zero(node):
                # x * 0.0 and x - x are 0 for every finite x (NaN otherwise, kept): their derivative is 0, where the
                # chain rule would give 0 * inf = NaN under an infinite outer derivative (sqrt(score * 0.0)). A
                # select that never picks x sends it exactly 0 and keeps the output in the graph (a detached score
                # would leave out without a grad_fn)
                never = torch.full((), False, dtype=torch.bool, device=a.device)
                a, b = (x if isinstance(n, Const) else torch.where(never, x, x.detach())
                        for x, n in ((a, node.left), (b, node.right)))
            return (_COMPARE if node.op in _COMPARE else _ARITH)[node.op](a, b)
        return _call(node)

    def _call(node: Call) -> torch.Tensor:
        f, dt = node.func, node.dtype
        if f == "where":
            if guard_branches and dt is DType.FLOAT and not pick_branches and not state["plain"]:
                return _guarded_where(*node.args)
            c = visit(node.args[0])
            if pick_branches and dt is DType.FLOAT and c.dim() > 0:
                return _picked_where(c, node.args[1], node.args[2])
            return torch.where(c, operand(node.args[1], dt), operand(node.args[2], dt))
        if f == "float":
            return operand(node.args[0], DType.FLOAT)
        if f == "int":
            x = visit(node.args[0])
            if x.is_floating_point():
                x = torch.trunc(x)  # toward zero
            return _cast(x, DType.INT, float_dtype)
        if guard_branches and not state["plain"] and dt is DType.FLOAT and f in ("min", "max", "clamp") and any(
                _guard_needed(a) for a in node.args):
            return _guarded_select(f, node.args)
        xs = [operand(a, dt if dt is not DType.BOOL else DType.FLOAT) for a in node.args]
        if f in _FLOAT_FUNCS:
            return _FLOAT_FUNCS[f](xs[0])
        if f == "abs":
            return torch.abs(xs[0])
        if f == "sign":
            return torch.sign(xs[0])
        if f in ("floor", "ceil"):
            if dt is DType.INT:
                return xs[0]
            return torch.floor(xs[0]) if f == "floor" else torch.ceil(xs[0])
        if f == "min":
            return _minimum(xs[0], xs[1])
        if f == "max":
            return _maximum(xs[0], xs[1])
        if f == "clamp":
            return _minimum(_maximum(xs[0], xs[1]), xs[2])
        raise AssertionError(f"unchecked function {f!r}")

    def _guarded_select(f: str, args) -> torch.Tensor:
        """min / max / clamp under guard_branches: each operand evaluated with its leaves guarded by where it is
        the chosen one (the select's own pick: the left operand on a tie, a NaN operand wherever it is one), so an
        unchosen operand's infinite local derivative (``clamp(log(score), -1.0, 1.0)`` at score 0) sends no NaN to
        its leaves. Values are those of the unguarded select."""
        outer = state["pick"]
        try:
            state["pick"], state["plain"] = None, True  # the values that decide the pick carry no gradient
            vals = [operand(a, DType.FLOAT).detach() for a in args]
            state["plain"] = False
            steps = [("max", 1), ("min", 2)] if f == "clamp" else [(f, 1)]
            # picks[i]: where operand i is the result; clamp is min(max(x, lo), hi)
            cur, picks = vals[0], [None] * len(args)
            for g, j in steps:
                left = _pick_left(g, cur, vals[j])
                picks = [left if p is None else torch.logical_and(p, left) for p in picks[:j]] + [
                    torch.logical_not(left)] + picks[j + 1:]
                cur = torch.where(left, cur, vals[j])
            out = None
            for a, pick in zip(args, picks):
                state["pick"] = pick if outer is None else torch.logical_and(outer, pick)
                x = operand(a, DType.FLOAT)
                out = x if out is None else torch.where(pick, x, out)
        finally:
            state["pick"], state["plain"] = outer, False
        return out

    def _guarded_where(cond: Expr, a: Expr, b: Expr) -> torch.Tensor:
        outer = state["pick"]
        branches = []
        try:
            state["pick"], state["plain"] = None, True  # a condition carries no gradient: its leaves need no guard
            c = visit(cond)
            state["plain"] = False
            for branch, pick in ((a, c), (b, torch.logical_not(c))):
                state["pick"] = pick if outer is None else torch.logical_and(outer, pick)
                branches.append(operand(branch, DType.FLOAT))
        finally:
            state["pick"], state["plain"] = outer, False
        return torch.where(c, *branches)

    def _picked_where(c: torch.Tensor, a: Expr, b: Expr) -> torch.Tensor:
        full = torch.broadcast_shapes(c.shape, *(t.shape for t in names.values()))
        c = c.expand(full)
        out = torch.zeros(full, dtype=float_dtype, device=c.device)
        for branch, pick in ((a, c), (b, ~c)):
            count = int(pick.sum())
            if count == 0:
                continue
            picked = {n: t.expand(full)[pick] for n, t in names.items()}
            vals = evaluate(branch, picked, tensors, float_dtype, device, int_dtype, full_consts, pick_branches=True)
            out = out.index_put((pick,), _cast(vals, DType.FLOAT, float_dtype).expand(count))
        return out

    try:
        return visit(expr)
    finally:
        # the nested functions reach one another through their closures' cells (visit calls itself): a reference
        # cycle holding names (the [B, H, Sq, Skv] score among them) and tensors until Python's cyclic collector
        # happens to run, which tensor bytes do not prompt; emptying the cells frees them on return
        _cast = guarded = const = operand = visit = _call = _guarded_select = _guarded_where = _picked_where = None


def positions(batch: int, heads: int, q_start: int, q_rows: int, kv_len: int, device=None) -> dict:
    """int64 grids of ``b`` [B,1,1,1], ``h`` [1,H,1,1], ``q_idx`` [1,1,rows,1] (from q_start) and ``kv_idx``
    [1,1,1,kv_len], mutually broadcastable."""
    return {
        "b": torch.arange(batch, device=device).view(batch, 1, 1, 1),
        "h": torch.arange(heads, device=device).view(1, heads, 1, 1),
        "q_idx": torch.arange(q_start, q_start + q_rows, device=device).view(1, 1, q_rows, 1),
        "kv_idx": torch.arange(kv_len, device=device).view(1, 1, 1, kv_len),
    }


def row_values(expr: Expr, batch: int, heads: int, q_len: int, kv_len: int, tensors: Mapping[str, torch.Tensor],
               float_dtype: torch.dtype, device) -> torch.Tensor:
    """A per-row expression (one that does not read ``kv_idx`` or ``score``, such as a Simplified.lse_shift)
    evaluated for every (b, h, q_idx): float_dtype [batch, heads, q_len]."""
    names = positions(batch, heads, 0, q_len, 1, device)
    names.update(q_len=torch.tensor(q_len, device=device), kv_len=torch.tensor(kv_len, device=device))
    val = evaluate(expr, names, tensors, float_dtype, device)
    return _cast_to(val, DType.FLOAT, float_dtype).expand(batch, heads, q_len, 1)[..., 0]
