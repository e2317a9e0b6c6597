"""Analytic block sparsity: classify every (query block, key block) tile as empty / partial / full from the mask
expression, without evaluating it on all q_len x kv_len positions.

How (one vectorised pass over the mask AST, no loop over blocks):
- every integer name becomes a per-block interval: ``q_idx`` a ``[1, 1, Qb, 1]`` pair of tensors (first and last
  real position of each query block; the last block may be ragged), ``kv_idx`` ``[1, 1, 1, Kb]``, ``b`` and ``h``
  exact points ``[B, 1, 1, 1]`` / ``[1, H, 1, 1]`` when the mask uses them;
- a comparison of two affine forms of (b, h, q_idx, kv_idx) is decided exactly from per-axis minima and maxima
  (one broadcast comparison of a ``[.., Qb, 1]`` tensor with a ``[.., 1, Kb]`` one);
- anything else goes through vectorised interval arithmetic: ``attnlang.intervals.RULES`` (the rules the scalar
  ``bounds`` uses) over tensors of per-block bounds, with float32 device semantics;
  tensor reads indexed by positions (``doc[q_idx]``, ``bias[h, kv_idx]``) use range-minimum / range-maximum
  tables of the tensor along the one axis the index varies on (a sparse table: O(S log block) memory and time);
- booleans are block kinds: 0 always false, 1 unknown, 2 always true; ``&`` is min, ``|`` max, ``~`` is 2 - k;
- blocks left partial are refined by evaluating the mask on their positions when that fits a budget, except those
  known to be partial: ordering comparisons of affine forms (decided at the block's corners), and == / != of reads
  along different axes whose per-block extremes meet (``doc[q_idx] == doc[kv_idx]`` with unaligned documents).

Sound for every mask the language can express: a block is only called empty (full) when no (every) real pair in
it is allowed, including float rounding (float comparisons keep a margin) and NaN (a comparison that may see NaN is
never called true).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .ast import (
    COMPARISONS,
    MIRRORED,
    NEGATED,
    Binary,
    Call,
    Const,
    DType,
    Expr,
    Index,
    Op,
    Unary,
    Var,
    children,
    names_used,
    walk,
)
from .check import Checked, bind, check_index_bounds, check_named_tensor, dtype_of_torch
from .errors import AttnLangError
from .intervals import (
    RULES,
    TENSOR,
    BlockKind,
    Interval,
    _absmax,
    _and,
    _eq,
    _ge,
    _gt,
    _le,
    _lt,
    _not,
    apply,
    ctx,
    decide,
    tensor_range,
)
from .intervals import _or_b as _or
from .simplify import affine_difference, affine_form, subtract_affine

__all__ = ["BlockKind", "BlockSparsity", "block_sparsity", "block_sparsity_of", "mask_block_sparsity", "known_exact",
           "REFINE_BUDGET", "positive_int"]


REFINE_BUDGET = 20_000_000  # (q, kv) positions evaluated, at most, to refine blocks left partial
_REFINE_CHUNK = 1 << 22      # positions evaluated at once while refining
_TABLE_BUDGET = 1 << 26      # elements of one range-min/max table
_EXACT = 2.0 ** 52           # beyond this float64 no longer holds every integer
_INT64_EDGE = 2.0 ** 63      # int() of a float at or beyond this magnitude is not a defined int64
_SLICE = 1 << 26             # blocks analysed at once (bounds the memory of intermediates)
MAX_BLOCKS = 1 << 30         # blocks (after broadcasting batch / heads) one analysis may classify
_MAX_LEN = 1 << 62           # lengths whose block bounds still fit int64


def _as_block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, bool):
        raise AttnLangError(f"block_size must be an int or a pair of ints, got {block_size!r}")
    if isinstance(block_size, numbers.Integral):
        block_size = (block_size, block_size)
    try:
        bq, bk = block_size
    except (TypeError, ValueError):
        raise AttnLangError(f"block_size must be an int or a pair of ints, got {block_size!r}") from None
    for x in (bq, bk):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
            raise AttnLangError(f"block sizes must be positive ints, got {block_size!r}")
        if x > _MAX_LEN:  # kind's block counts and the analysis' int64 block bounds
            raise AttnLangError(f"block sizes must be at most 2**62, got {block_size!r}")
    return int(bq), int(bk)


def positive_int(name: str, value) -> int:
    """``value`` as an int, or AttnLangError naming ``name`` unless it is a positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:  # numpy ints too
        raise AttnLangError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _length(name: str, value) -> int:
    """``value`` as an int, or AttnLangError naming ``name`` unless it is an int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise AttnLangError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _as_device(device) -> torch.device:
    """``device`` as a torch.device that exists here."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise AttnLangError(f"device {device!r} is not a usable torch device here: {e}") from None
    if device.type == "meta":
        raise AttnLangError("device 'meta' holds no values; block_sparsity's kind needs a real device")
    return device


@dataclass(frozen=True, eq=False)
class BlockSparsity:
    """The block structure of a variant's mask for one set of lengths.

    kind: int8 ``[batch, heads, q_blocks, kv_blocks]``; 0 empty, 1 partial, 2 full (BlockKind). The batch / heads
        dimensions are 1 when the mask depends on neither ``b`` nor ``h``.
    density (a property, computed on first use): fraction of the real (q, kv) pairs that lie in non-empty blocks
        (ragged last blocks counted by their real size), averaged over batch and heads; 0.0 when q_len or kv_len
        is 0 (``kind`` then has 0 query or key blocks).
    block_size: (query rows, key columns) per block. q_len, kv_len: the lengths analysed.
    mask: the bound (fully typed) simplified mask that was analysed. tensors: the tensors it reads.
    refined: blocks whose kind was decided by evaluating the mask on their positions.
    """

    kind: torch.Tensor
    block_size: tuple[int, int]
    q_len: int
    kv_len: int
    mask: Expr = field(repr=False)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    refined: int = 0

    @functools.cached_property
    def density(self) -> float:
        return _density(self.kind, self.q_len, self.kv_len, *self.block_size)

    @property
    def q_blocks(self) -> int:
        return self.kind.shape[2]

    @property
    def kv_blocks(self) -> int:
        return self.kind.shape[3]

    def counts(self) -> dict[str, int]:
        """Number of empty, partial and full blocks (over every batch / head entry of ``kind``)."""
        k = self.kind
        return {"empty": int((k == 0).sum()), "partial": int((k == 1).sum()), "full": int((k == 2).sum())}

    def summary(self) -> str:
        c = self.counts()
        return (f"{self.q_len}x{self.kv_len} in {self.block_size[0]}x{self.block_size[1]} blocks: "
                f"{c['full']} full, {c['partial']} partial, {c['empty']} empty; density {self.density:.4f}")

    def default_mask_mod(self, device=None):
        """A FlexAttention mask_mod ``(b, h, q_idx, kv_idx) -> bool`` evaluating the analysed mask."""
        from .lower_torch import evaluate
        mask, tensors = self.mask, dict(self.tensors)
        q_len, kv_len = self.q_len, self.kv_len
        if device is not None:
            tensors = {n: t.to(device) for n, t in tensors.items()}

        def mask_mod(b, h, q_idx, kv_idx):
            dev = q_idx.device
            names = {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx,
                     "q_len": torch.tensor(q_len, device=dev), "kv_len": torch.tensor(kv_len, device=dev)}
            return evaluate(mask, names, tensors, torch.float32, dev)
        return mask_mod

    def _device(self, device):
        if device is not None:
            return _as_device(device)
        for t in self.tensors.values():
            return t.device
        return self.kind.device

    def _lists(self, which: int, device, transpose: bool = False):
        """Counts int32 [B, H, Qb] and indices int32 [B, H, Qb, Kb] of the blocks of one kind, in kv order
        (transpose: counts [B, H, Kb] and indices [B, H, Kb, Qb], in q order, as a backward pass walks them)."""
        k = self.kind.to(device)
        if transpose:
            k = k.transpose(-1, -2)
        hit = k == which
        cnt = hit.sum(-1, dtype=torch.int32)
        # a stable sort that puts the hits first keeps them in increasing kv-block order
        idx = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cnt.contiguous(), idx.contiguous()

    def to_flex(self, mask_mod=None, device=None):
        """A ``torch.nn.attention.flex_attention.BlockMask`` with partial and full blocks marked.

        mask_mod: the mask_mod to attach (applied in partial blocks); default: one evaluating the analysed mask.
        device: where the index tensors live (default: the tensors' device, else the CPU).
        """
        from torch.nn.attention.flex_attention import BlockMask
        if mask_mod is not None and not callable(mask_mod):
            raise AttnLangError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got "
                                f"{type(mask_mod).__name__}")
        dev = self._device(device)
        if mask_mod is None:
            mask_mod = self.default_mask_mod(dev)
        kv_num, kv_idx = self._lists(int(BlockKind.PARTIAL), dev)
        full_num, full_idx = self._lists(int(BlockKind.FULL), dev)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=self.block_size,
                                        mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len))

    def to_fa4(self, device=None, batch: int | None = None, heads: int | None = None, transpose: bool = False):
        """flash_attn.cute's ``BlockSparseTensorsTorch`` (mask_block_cnt / mask_block_idx for partial blocks,
        full_block_cnt / full_block_idx for full ones; int32; counts [B, H, Qb], indices [B, H, Qb, Kb]).

        batch, heads: expand broadcast (size-1) dimensions to these sizes.
        transpose: the lists per kv block instead (counts [B, H, Kb], indices [B, H, Kb, Qb]), for the backward.
        Raises:
            AttnLangError: flash_attn (flash-attn-4) is not installed.
        """
        try:
            from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        except ImportError as e:
            raise AttnLangError(f"to_fa4() needs flash-attn-4 (flash_attn.cute), which is not importable here: "
                                f"{e}") from None
        dev = self._device(device)
        mask_cnt, mask_idx = self._lists(int(BlockKind.PARTIAL), dev, transpose)
        full_cnt, full_idx = self._lists(int(BlockKind.FULL), dev, transpose)
        if batch is not None or heads is not None:
            B = batch if batch is not None else mask_cnt.shape[0]
            H = heads if heads is not None else mask_cnt.shape[1]
            mask_cnt, full_cnt = (t.expand(B, H, *t.shape[2:]).contiguous() for t in (mask_cnt, full_cnt))
            mask_idx, full_idx = (t.expand(B, H, *t.shape[2:]).contiguous() for t in (mask_idx, full_idx))
        fields = dict(mask_block_cnt=mask_cnt, mask_block_idx=mask_idx, full_block_cnt=full_cnt,
                      full_block_idx=full_idx)
        if "block_size" in getattr(BlockSparseTensorsTorch, "_fields", ()):
            fields["block_size"] = tuple(self.block_size)
        return BlockSparseTensorsTorch(**fields)


# ---------------------------------------------------------------------------------------------------------------
# entry point

def block_sparsity(variant, /, q_len: int, kv_len: int, batch: int = 1, heads: int = 1,
                   block_size=(128, 128), device=None, refine: bool = True, **tensors) -> BlockSparsity:
    """Classify every (query block, key block) tile of ``variant``'s simplified mask.

    Args:
        variant: an attnlang Variant (read for its ``simplified.mask`` and ``checked``).
        q_len, kv_len: sequence lengths (ints >= 0; with a 0, ``kind`` has no block along that axis).
        batch, heads: sizes of ``b`` and ``h`` (query heads); only used when the mask reads them.
        block_size: int or (q rows, kv columns).
        device: device of ``kind`` (default: that of the tensors, else the CPU); the analysis itself runs on the
            CPU, from O(S) summaries of the tensors.
        refine: evaluate the mask on blocks left partial, within REFINE_BUDGET positions.
        **tensors: the tensors the mask reads, by name.
    Returns:
        BlockSparsity.
    Raises:
        AttnLangError: bad sizes, missing / extra / mis-shaped tensors, an index that can leave its tensor.
    """
    return block_sparsity_of(variant, q_len, kv_len, batch, heads, block_size, tensors, device, refine)


def block_sparsity_of(variant, q_len: int, kv_len: int, batch: int, heads: int, block_size,
                      tensors: Mapping[str, torch.Tensor], device=None, refine: bool = True) -> BlockSparsity:
    """``block_sparsity`` with the tensors in a mapping, so that any tensor name (``device``, ``batch``, ...) is
    read as a tensor and never taken for an argument."""
    checked = variant.checked
    return mask_block_sparsity(variant.simplified.mask, checked.tensors, checked.sources, q_len, kv_len, batch,
                               heads, block_size, tensors, device, refine)


def mask_block_sparsity(mask: Expr, tensor_dims: Mapping[str, int], sources: Mapping[str, str], q_len: int,
                        kv_len: int, batch: int, heads: int, block_size, tensors: Mapping[str, torch.Tensor],
                        device=None, refine: bool = True) -> BlockSparsity:
    """The block sparsity of one mask expression: what ``Variant.block_sparsity`` and the backends call.

    Args:
        mask: the simplified mask (typed at compile time, or already bound to the tensors' dtypes:
            ``CallPlan.mask``); it is bound here to the element types of ``tensors``.
        tensor_dims: name -> number of indices of every tensor the variant reads (``Checked.tensors``): a tensor
            given that is not among them is an error.
        sources: {"score": text, "mask": text} as written, for error carets.
        tensors: the tensors the mask reads, by name, in a mapping (any name, even ``device``, is a tensor).
        the rest: as ``block_sparsity``.
    """
    if not isinstance(refine, bool):
        raise AttnLangError(f"refine must be True or False, got {refine!r}")
    q_len, kv_len = _length("q_len", q_len), _length("kv_len", kv_len)
    batch, heads = positive_int("batch", batch), positive_int("heads", heads)
    bq, bk = _as_block_size(block_size)
    wanted = sorted({n.tensor for n in walk(mask) if isinstance(n, Index)})
    for name, t in tensors.items():
        check_named_tensor(name, t, tensor_dims)
    for name in wanted:
        if name not in tensors:
            raise AttnLangError(f"the mask reads tensor {name!r}; pass it by name ({name}=<tensor>)")
    used = {n: tensors[n] for n in wanted}
    if device is None:
        device = next(iter(used.values())).device if used else torch.device("cpu")
    device = _as_device(device)

    dtypes = {n: dtype_of_torch(t.dtype) for n, t in used.items()}
    mask = bind(Checked(Const(0.0, DType.FLOAT), mask, tensor_dims, sources), dtypes).mask
    # a length of 0: no position exists, so only reads whose index names none are checked (check_index_bounds)
    empty = frozenset(n for n, size in (("q_idx", q_len), ("kv_idx", kv_len), ("q_len", q_len), ("kv_len", kv_len))
                      if size == 0)
    env = {"b": Interval(0, batch - 1), "h": Interval(0, heads - 1), "q_idx": Interval(0, max(q_len - 1, 0)),
           "kv_idx": Interval(0, max(kv_len - 1, 0)), "q_len": Interval(q_len, q_len),
           "kv_len": Interval(kv_len, kv_len)}
    env.update({n: tensor_range(t) for n, t in used.items()})
    check_index_bounds(Checked(Const(0.0, DType.FLOAT), mask, tensor_dims, sources), env,
                       {n: tuple(t.shape) for n, t in used.items()}, empty=empty)

    for name, n in (("q_len", q_len), ("kv_len", kv_len)):
        if n > _MAX_LEN:
            raise AttnLangError(f"{name} {n} is too long for block sparsity; at most 2**62")
    mask_names = names_used(mask)
    blocks = ((batch if "b" in mask_names else 1) * (heads if "h" in mask_names else 1) * -(-q_len // bq)
              * -(-kv_len // bk))
    if blocks > MAX_BLOCKS:
        raise AttnLangError(f"{q_len}x{kv_len} in {bq}x{bk} blocks makes {blocks} blocks; at most {MAX_BLOCKS} "
                            f"are classified at once: use a larger block_size")

    if not (q_len and kv_len):  # no (q, kv) pair: no block on the empty axis, none to classify
        B, H = (batch if "b" in mask_names else 1), (heads if "h" in mask_names else 1)
        kind = torch.zeros((B, H, -(-q_len // bq), -(-kv_len // bk)), dtype=torch.int8, device=device)
        return BlockSparsity(kind=kind, block_size=(bq, bk), q_len=q_len, kv_len=kv_len, mask=mask,
                             tensors=dict(used))
    # the analysis runs on the CPU (its inputs are O(S) summaries and its output O(blocks)); kind moves at the end
    cpu = torch.device("cpu")
    grid = _Grid(q_len, kv_len, batch, heads, bq, bk, names_used(mask), cpu)
    track = refine and not known_exact(mask, q_len, kv_len)
    on_device = {n: t.detach().to(cpu) for n, t in used.items()}
    kind = torch.empty(grid.shape, dtype=torch.int8, device=cpu)
    sure = None  # where partial blocks are surely partial; allocated when a slice knows any
    # query blocks in slices of about _SLICE blocks: intermediates stay in cache and memory stays small
    step = max(1, _SLICE // max(1, grid.Kb * grid.B * grid.H))
    tables: dict = {}
    for r0 in range(0, grid.Qb, step):
        r1 = min(grid.Qb, r0 + step)
        got = _Analysis(grid.rows(r0, r1), on_device, tables).kind(mask, track_sure=track)
        k, s = got if track else (got, None)
        if r0 == 0 and r1 == grid.Qb and tuple(k.shape) == grid.shape and k.is_contiguous():
            kind = k  # one slice: no copy
        else:
            kind[:, :, r0:r1] = k
        if track and s is not False:
            if sure is None:
                sure = torch.zeros(grid.shape, dtype=torch.bool, device=cpu)
            sure[:, :, r0:r1] = s
    refined = 0
    if track:
        unsure = kind == 1
        if sure is not None:
            unsure &= ~sure
        kind, refined = _refine(kind, unsure, mask, grid, on_device)
    return BlockSparsity(kind=kind.to(device), block_size=(bq, bk), q_len=q_len, kv_len=kv_len, mask=mask,
                         tensors={n: t for n, t in used.items()}, refined=refined)


class _Grid:
    """Block geometry: per-block first / last real position along each axis, as broadcastable 4-D tensors."""

    def __init__(self, q_len, kv_len, batch, heads, bq, bk, used, device):
        self.q_len, self.kv_len, self.bq, self.bk = q_len, kv_len, bq, bk
        self.Qb, self.Kb = -(-q_len // bq), -(-kv_len // bk)
        self.B = batch if "b" in used else 1
        self.H = heads if "h" in used else 1
        self.device = device
        qs = torch.arange(self.Qb, device=device, dtype=torch.int64) * bq
        ks = torch.arange(self.Kb, device=device, dtype=torch.int64) * bk
        self.lo = {"q_idx": qs.view(1, 1, -1, 1), "kv_idx": ks.view(1, 1, 1, -1),
                   "b": torch.arange(self.B, device=device).view(-1, 1, 1, 1),
                   "h": torch.arange(self.H, device=device).view(1, -1, 1, 1)}
        self.hi = {"q_idx": torch.clamp(qs + bq, max=q_len).view(1, 1, -1, 1) - 1,
                   "kv_idx": torch.clamp(ks + bk, max=kv_len).view(1, 1, 1, -1) - 1,
                   "b": self.lo["b"], "h": self.lo["h"]}
        self.consts = {"q_len": q_len, "kv_len": kv_len}

    @property
    def shape(self):
        return (self.B, self.H, self.Qb, self.Kb)

    def rows(self, r0: int, r1: int) -> "_Grid":
        """The same grid restricted to query blocks [r0, r1) (positions stay absolute)."""
        sub = object.__new__(_Grid)
        sub.__dict__.update(self.__dict__)
        sub.lo = dict(self.lo, q_idx=self.lo["q_idx"][:, :, r0:r1])
        sub.hi = dict(self.hi, q_idx=self.hi["q_idx"][:, :, r0:r1])
        sub.Qb = r1 - r0
        return sub


# ---------------------------------------------------------------------------------------------------------------
# the vectorised analysis


def _leaf_bound(node: Expr, negated: bool, q_len: int, kv_len: int):
    """An integer affine comparison as ((a, c) of d = a*q_idx + c*kv_idx, lower, upper, other) with
    lower <= d <= upper (None: unbounded), or None when it is not one. ``other``: it also reads b / h, or is !=."""
    if not (isinstance(node, Binary) and node.op in COMPARISONS):
        return None
    diff = affine_difference(node.left, node.right)
    if diff is None:
        return None
    coef, c = diff
    c += coef.pop("q_len", 0) * q_len + coef.pop("kv_len", 0) * kv_len
    other = bool(coef.get("b") or coef.get("h"))
    form = (coef.get("q_idx", 0), coef.get("kv_idx", 0))
    op = NEGATED[node.op] if negated else node.op
    if next((x for x in form if x), 0) < 0:  # a <= d and d < c are one form seen from both sides
        form, c, op = (-form[0], -form[1]), -c, MIRRORED[op]
    t = -c  # d OP t
    bounds = {Op.GE: (t, None), Op.GT: (t + 1, None), Op.LE: (None, t), Op.LT: (None, t - 1), Op.EQ: (t, t),
              Op.NE: (None, None)}[op]
    return form, bounds[0], bounds[1], other, op in (Op.EQ, Op.NE)


def known_exact(mask: Expr, q_len: int = 1, kv_len: int = 1) -> bool:
    """True when the interval analysis of ``mask`` is exact, so refinement cannot change a block: a constant, a
    single ordering comparison of an affine form, or an ``&`` of (possibly negated) comparisons of one affine
    form d with unit coefficients whose bounds leave d a non-empty range (d then takes every integer between its
    block minimum and maximum, and each conjunct is a half-line, so 'some pair' is decided by each alone)."""
    if isinstance(mask, Const):
        return True
    leaves, stack = [], [mask]
    while stack:
        n = stack.pop()
        if isinstance(n, Binary) and n.op is Op.AND:
            stack.extend((n.left, n.right))
            continue
        negated = False
        while isinstance(n, Unary) and n.op is Op.NOT:
            n, negated = n.operand, not negated
        got = _leaf_bound(n, negated, q_len, kv_len)
        if got is None:
            return False
        leaves.append(got)
    unit = all(x in (-1, 0, 1) for x in leaves[0][0])
    if len(leaves) == 1:  # one comparison: decided at the block's corners; == / != need every value between
        return unit or not leaves[0][4]
    forms = {leaf[0] for leaf in leaves}
    if len(forms) != 1 or not unit or any(leaf[3] for leaf in leaves):
        return False
    if any(leaf[4] and leaf[1] is None for leaf in leaves):
        return False  # a != inside an &: d != t can empty a range the other conjuncts leave
    lows = [leaf[1] for leaf in leaves if leaf[1] is not None]
    highs = [leaf[2] for leaf in leaves if leaf[2] is not None]
    return not lows or not highs or max(lows) <= min(highs)


class _Analysis:
    """Evaluates a bound mask over the block grid. Numeric nodes give (lo, hi, may_nan); boolean nodes give an
    int8 kind tensor (0 false, 1 unknown, 2 true)."""

    def __init__(self, grid: _Grid, tensors: Mapping[str, torch.Tensor], tables: dict | None = None):
        self.g = grid
        self.tensors = tensors
        self._tables: dict = {} if tables is None else tables
        self._attained: set[int] = set()  # numeric nodes whose per-block lo and hi are values some position takes

    # -- driver: post-order without recursion, so deep expressions cannot overflow the stack --
    def kind(self, root: Expr, track_sure: bool = False):
        """The root's kind, int8 broadcastable to [B, H, Qb, Kb]; with ``track_sure`` also a bool tensor (or
        bool) marking the partial blocks known to be really partial, which refinement can skip."""
        done: dict[int, object] = {}
        self._done = done  # float comparisons look up the magnitudes of their operands' subtrees
        sure: dict[int, object] = {}
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if isinstance(node, Binary) and node.op in COMPARISONS and self._affine_pair(node) is not None:
                k = self._affine_compare(node)
                done[id(node)] = k
                if track_sure:
                    sure[id(node)] = self._leaf_sure(node, k)
                continue
            kids = children(node)
            if not expanded and kids:
                stack.append((node, True))
                stack.extend((k, False) for k in kids if id(k) not in done)
                continue
            done[id(node)] = self._visit(node, [done[id(k)] for k in kids])
            if track_sure:
                sure[id(node)] = _sure_of(node, [done[id(k)] for k in kids], [sure.get(id(k), False) for k in kids])
                if isinstance(node, Binary) and node.op in (Op.EQ, Op.NE):
                    sure[id(node)] = self._equality_sure(node, done[id(node)])
        out = done[id(root)]
        if not isinstance(out, torch.Tensor):
            out = torch.tensor(int(out), dtype=torch.int8, device=self.g.device)
        out = out.to(torch.int8).reshape((1,) * (4 - out.dim()) + tuple(out.shape)) if out.dim() < 4 else out
        return (out, sure.get(id(root), False)) if track_sure else out

    def _leaf_sure(self, node: Binary, k):
        """An affine comparison's partial blocks are really partial for orderings (decided at the corners) and for
        == / != with unit coefficients (every value between the block's extremes is taken)."""
        coef, _ = self._affine_pair(node)
        if node.op in (Op.EQ, Op.NE) and any(abs(c) != 1 for v, c in coef.items() if v in ("q_idx", "kv_idx")):
            return False
        return (k == 1) if isinstance(k, torch.Tensor) else k == 1

    def _equality_sure(self, node: Binary, k):
        """== / != of two int sides whose per-block bounds are attained (tensor reads at q_idx + c / kv_idx + c,
        constants), one varying along the query axis only and the other along the key axis only
        (``doc[q_idx] == doc[kv_idx]``): where an extreme of one side equals an extreme of the other, some pair
        of the block has equal sides and, the block being partial, another has not, so refinement cannot change
        it (unaligned documents leave many such blocks)."""
        left, right = node.left, node.right
        if not isinstance(k, torch.Tensor) or left.dtype is not DType.INT or right.dtype is not DType.INT:
            return False
        if id(left) not in self._attained or id(right) not in self._attained:
            return False
        axes_l, axes_r = names_used(left) & _AXES, names_used(right) & _AXES
        if len(axes_l) > 1 or len(axes_r) > 1 or (axes_l and axes_l == axes_r):
            return False
        x, y = self._done[id(left)], self._done[id(right)]
        common = _or(_or(_eq(x[0], y[0]), _eq(x[0], y[1])), _or(_eq(x[1], y[0]), _eq(x[1], y[1])))
        return _and(k == 1, common)

    # -- affine comparisons: exact --
    def _affine_pair(self, node: Binary):
        if node.left.dtype is not DType.INT or node.right.dtype is not DType.INT:
            return None
        a, b = affine_form(node.left), affine_form(node.right)
        if a is None or b is None:
            return None
        # int64 arithmetic is exact modulo 2^64, so each side is exact when its true value fits; past that the
        # run time wraps and the generic path (which gives up on such magnitudes) decides
        top = max(self.g.q_len, self.g.kv_len, self.g.B, self.g.H)
        if any(abs(f[1]) + sum(abs(v) for v in f[0].values()) * top >= 2 ** 52 for f in (a, b)):
            return None
        coef, c = subtract_affine(a, b)
        c += coef.pop("q_len", 0) * self.g.q_len + coef.pop("kv_len", 0) * self.g.kv_len
        return coef, c

    def _affine_compare(self, node: Binary) -> torch.Tensor:
        """left - right = sum(coef * var) + c; its exact min and max over the block split into a part varying
        along the kv axis and a part for the other axes, so each decision is one broadcast comparison."""
        coef, c = self._affine_pair(node)
        g = self.g
        lo_rest, hi_rest, lo_kv, hi_kv = c, c, 0, 0
        for var, k in coef.items():
            lo, hi = (g.lo[var] * k, g.hi[var] * k) if k > 0 else (g.hi[var] * k, g.lo[var] * k)
            if var == "kv_idx":
                lo_kv, hi_kv = lo, hi
            else:
                lo_rest, hi_rest = lo_rest + lo, hi_rest + hi
        # d in [lo_rest + lo_kv, hi_rest + hi_kv]; every test below is "rest vs -kv part"
        neg_lo_kv, neg_hi_kv = -lo_kv, -hi_kv
        parts = [lo_rest, hi_rest, neg_lo_kv, neg_hi_kv]
        if max(_absmax(x, x) for x in parts) < 2 ** 30:  # int32 halves the memory traffic, exactly
            lo_rest, hi_rest, neg_lo_kv, neg_hi_kv = (x.to(torch.int32) if isinstance(x, torch.Tensor) else x
                                                      for x in parts)
        op = node.op
        if op in (Op.GE, Op.GT):
            t = 0 if op is Op.GE else 1          # d >= t
            full = _ge(lo_rest, neg_lo_kv + t)
            some = _ge(hi_rest, neg_hi_kv + t)
        elif op in (Op.LE, Op.LT):
            t = 0 if op is Op.LE else -1          # d <= t
            full = _le(hi_rest, neg_hi_kv + t)
            some = _le(lo_rest, neg_lo_kv + t)
        else:
            point = _and(_eq(lo_rest, neg_lo_kv), _eq(hi_rest, neg_hi_kv))
            outside = _or(_gt(lo_rest, neg_lo_kv), _lt(hi_rest, neg_hi_kv))
            if op is Op.EQ:
                full, some = point, _not(outside)
            else:
                full, some = outside, _not(point)
        return _kind(full, some, self.g.device)

    # -- generic interval evaluation --
    def _visit(self, node: Expr, kids: list):
        g = self.g
        if isinstance(node, Const):
            if node.dtype is DType.BOOL:
                return 2 if node.value else 0
            v = float(node.value)
            self._attained.add(id(node))
            return (v, v, False)
        if isinstance(node, Var):
            if node.name in g.consts:
                v = float(g.consts[node.name])
                return (v, v, False)
            return (g.lo[node.name].double(), g.hi[node.name].double(), False)
        if isinstance(node, Index):
            return self._index(node, kids)
        if isinstance(node, Unary):
            (x,) = kids
            if node.op is Op.NOT:
                return 2 - x
            return apply(Op.NEG, TENSOR, _DEVICE, [x])
        if isinstance(node, Binary):
            x, y = kids
            if node.op is Op.AND:
                return _kmin(x, y)
            if node.op is Op.OR:
                return _kmax(x, y)
            if node.op in COMPARISONS:
                return self._compare(node, x, y)
            if _int_past_exact((node.left, node.right), kids):
                return _TOP(False)
            return apply(node.op, TENSOR, ctx(node.dtype is DType.INT, True), [_as_num(x), _as_num(y)])
        return self._call(node, kids)

    def _compare(self, node: Binary, x, y):
        if isinstance(x, (int, torch.Tensor)) and not isinstance(x, tuple):
            x = _kind_to_interval(x)
        if isinstance(y, (int, torch.Tensor)) and not isinstance(y, tuple):
            y = _kind_to_interval(y)
        is_float = DType.FLOAT in (node.left.dtype, node.right.dtype)
        xlo, xhi, xn = x
        ylo, yhi, yn = y
        may_nan = xn or yn
        big = _too_big(xlo, xhi) or _too_big(ylo, yhi)
        if is_float:
            # float32 on the backends rounds differently from float64 here, by up to a few ulps of the largest
            # value met on the way (cancellation included): decide only with a margin that covers it
            m = 1e-5 * max(1.0, self._magnitude(node))
        else:
            m = 0.0
        if big:
            return 1
        if not is_float and all(_finite(v) for v in (xlo, xhi, ylo, yhi)):
            # integer bounds below 2^52 in magnitude: int32 when they fit, exactly, for less memory traffic
            if max(_absmax(xlo, xhi), _absmax(ylo, yhi)) < 2 ** 30:
                xlo, xhi, ylo, yhi = (v.to(torch.int32) if isinstance(v, torch.Tensor) else v
                                      for v in (xlo, xhi, ylo, yhi))
        full, some = decide(node.op, (xlo, xhi, may_nan), (ylo, yhi, False), TENSOR, m)
        return _kind(full, some, self.g.device)

    def _magnitude(self, node: Expr) -> float:
        """The largest finite magnitude any numeric node under ``node`` can take on this grid."""
        best = 0.0
        for n in walk(node):
            v = self._done.get(id(n))
            if isinstance(v, tuple):
                best = max(best, _absmax(v[0], v[1]))
        return best

    def _call(self, node: Call, kids: list):
        f = node.func
        if f == "where":
            c, a, b = kids
            if node.dtype is DType.BOOL:
                ct, at, bt = _k(c, None).to(self.g.device), _k(a, None).to(self.g.device), _k(b, None).to(self.g.device)
                # a where c is always true, b where always false, else decided only where a and b agree
                return torch.where(ct == 2, at, torch.where(ct == 0, bt, _hull_kind(at, bt)))
            a, b = _as_num(a), _as_num(b)
            ct = _t(c)
            lo = torch.where(ct == 2, _t(a[0]), torch.where(ct == 0, _t(b[0]), torch.minimum(_t(a[0]), _t(b[0]))))
            hi = torch.where(ct == 2, _t(a[1]), torch.where(ct == 0, _t(b[1]), torch.maximum(_t(a[1]), _t(b[1]))))
            return (lo, hi, a[2] or b[2])
        if node.dtype is DType.BOOL:
            return 1  # no other function gives a bool
        xs = [_as_num(k) for k in kids]
        if _int_past_exact(node.args, kids):
            return _TOP(False)
        if f in RULES:
            return apply(f, TENSOR, ctx(node.dtype is DType.INT, True, node.args[0].dtype is DType.FLOAT), xs)
        return _TOP(True)

    # -- tensor reads --
    def _index(self, node: Index, kids: list):
        t = self.tensors[node.tensor]
        idx = [_as_num(k) for k in kids]
        shape = t.shape
        if t.numel() == 0:
            return _TOP(True)
        key = ("values", node.tensor)
        if key not in self._tables:  # shared by every slice of the grid
            vals = t.detach()
            vals = (vals.to(torch.int8) if vals.dtype == torch.bool else vals).double()
            # NaN compares false, and float64 loses integers past 2^52: such tensors are not summarised
            unusable = bool(torch.isnan(vals).any()) or bool((torch.isfinite(vals) & (vals.abs() > _EXACT)).any())
            self._tables[key] = None if unusable else vals
        vals = self._tables[key]
        if vals is None:
            return _TOP(True) if node.dtype is not DType.BOOL else 1
        los, his, ranged = [], [], []
        for axis, (lo, hi, _) in enumerate(idx):
            size = shape[axis]
            lo = torch.clamp(torch.as_tensor(lo, device=self.g.device).double(), 0, size - 1).long()
            hi = torch.clamp(torch.as_tensor(hi, device=self.g.device).double(), 0, size - 1).long()
            los.append(lo)
            his.append(hi)
            if not torch.equal(lo.expand(torch.broadcast_shapes(lo.shape, hi.shape)),
                               hi.expand(torch.broadcast_shapes(lo.shape, hi.shape))):
                ranged.append(axis)
        if not ranged:
            v = vals[tuple(los)]
            out = (v, v, False)
            self._attained.add(id(node))
        elif len(ranged) == 1:
            out = self._range_query(node.tensor, vals, ranged[0], los, his)
            if out[2] is None:  # exact minima and maxima over each block's positions
                out = (out[0], out[1], False)
                if _unit_step(node.indices[ranged[0]]):
                    self._attained.add(id(node))
        else:
            out = (float(vals.min()), float(vals.max()), False)
        if node.dtype is DType.BOOL:
            return _kind(_ge(out[0], 1), _ge(out[1], 1), self.g.device)
        return out

    def _range_query(self, name, vals, axis, los, his):
        lo_a, hi_a = los[axis], his[axis]
        length = (hi_a - lo_a + 1).clamp(min=1)
        longest = int(length.max())
        levels = max(1, longest.bit_length())
        if vals.numel() * levels > _TABLE_BUDGET:
            return (float(vals.min()), float(vals.max()), False)
        key = (name, axis, levels)
        tables = self._tables.get(key)
        if tables is None:
            tables = (_sparse_table(vals.movedim(axis, -1), levels, torch.minimum).movedim(-1, axis + 1),
                      _sparse_table(vals.movedim(axis, -1), levels, torch.maximum).movedim(-1, axis + 1))
            self._tables[key] = tables
        # level k = floor(log2(length)); the two windows [lo, lo + 2^k) and (hi - 2^k, hi] cover [lo, hi]
        k = torch.floor(torch.log2(length.double())).long().clamp(max=levels - 1)
        k = torch.where((1 << (k + 1)) <= length, k + 1, k).clamp(max=levels - 1)
        k = torch.where((1 << k) > length, k - 1, k).clamp(min=0)
        second = hi_a - (1 << k) + 1
        first = [k] + [lo_a if i == axis else los[i] for i in range(len(los))]
        last = [k] + [second if i == axis else los[i] for i in range(len(los))]
        tmin, tmax = tables
        lo = torch.minimum(tmin[tuple(first)], tmin[tuple(last)])
        hi = torch.maximum(tmax[tuple(first)], tmax[tuple(last)])
        return (lo, hi, None)  # None: per-block extremes (callers turn it into False)


_AXES = frozenset({"q_idx", "kv_idx"})


def _unit_step(index: Expr) -> bool:
    """An index that takes every integer between its per-block bounds: q_idx or kv_idx with coefficient +-1, plus
    terms constant over a block (b, h, lengths, constants)."""
    form = affine_form(index)
    if form is None:
        return False
    coef = form[0]
    return sorted(abs(coef.get(a, 0)) for a in _AXES) == [0, 1]


def _sure_of(node: Expr, kinds: list, sures: list):
    """Where a partial result is known to be really partial: ~ keeps it; x & y is really partial where one side is
    surely partial and the other full; x | y where one side is surely partial and the other empty."""
    if isinstance(node, Unary) and node.op is Op.NOT:
        return sures[0]
    if isinstance(node, Binary) and node.op in (Op.AND, Op.OR):
        other = 2 if node.op is Op.AND else 0
        (a, b), (sa, sb) = kinds, sures
        return _or(_and(sa, _eq(b, other)), _and(sb, _eq(a, other)))
    return False


def _sparse_table(vals: torch.Tensor, levels: int, fn) -> torch.Tensor:
    """[levels, ..., S]: entry k at position i reduces vals[..., i : i + 2^k] (entries whose window would pass the
    end keep the level below; no query reads them)."""
    size = vals.shape[-1]
    out = torch.empty((levels,) + tuple(vals.shape), dtype=vals.dtype, device=vals.device)
    out[0] = vals
    for k in range(1, levels):
        step = 1 << (k - 1)
        out[k] = out[k - 1]
        if step < size:
            fn(out[k - 1][..., :size - step], out[k - 1][..., step:], out=out[k][..., :size - step])
    return out


# ---------------------------------------------------------------------------------------------------------------
# small vectorised helpers: operands are Python numbers or tensors

def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)


_DEVICE = ctx(device=True)  # bounds of what the backends compute (float32 rounding and overflow)


def _kind(full, some, device):
    """Kind from 'every pair allowed' and 'some pair allowed': full + some (a contradiction gives 1, partial)."""
    if isinstance(some, torch.Tensor):
        k = some.view(torch.int8) if some.dtype == torch.bool else some.to(torch.int8)
        if isinstance(full, torch.Tensor):
            f = full.view(torch.int8) if full.dtype == torch.bool else full.to(torch.int8)
            return k.add_(f) if torch.broadcast_shapes(f.shape, k.shape) == k.shape else k + f
        return k + 1 if full else k
    s = int(bool(some))
    if isinstance(full, torch.Tensor):
        return full.to(torch.int8) + s
    return int(bool(full)) + s


def _kmin(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.minimum(_k(a, b), _k(b, a))


def _kmax(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return torch.maximum(_k(a, b), _k(b, a))


def _k(x, other):
    if isinstance(x, torch.Tensor):
        return x.to(torch.int8)
    dev = other.device if isinstance(other, torch.Tensor) else None
    return torch.tensor(x, dtype=torch.int8, device=dev)


def _hull_kind(a, b):
    """The kind of 'a or b, we do not know which': decided only where both agree."""
    return torch.where(a == b, a, torch.ones_like(a))


def _kind_to_interval(k):
    if isinstance(k, int):
        return (float(k >= 2), float(k >= 1), False)
    return ((k >= 2).double(), (k >= 1).double(), False)


def _as_num(x):
    if isinstance(x, tuple):
        return x
    return _kind_to_interval(x)


def _TOP(nan: bool):
    return (-math.inf, math.inf, nan)


def _finite(v) -> bool:
    return bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else math.isfinite(v)


def _too_big(lo, hi) -> bool:
    return _absmax(lo, hi) >= _EXACT


def _int_past_exact(args, kids) -> bool:
    """An int argument with a finite bound past 2**52: its float64 bounds are rounded (a literal 2**60 + 1 is
    2**60), so a rule that maps it back to small values (% 2**60, // 2**60, & 1, ...) could miss the real values."""
    return any(a.dtype is DType.INT and isinstance(k, tuple) and _too_big(k[0], k[1]) for a, k in zip(args, kids))


# ---------------------------------------------------------------------------------------------------------------
# refinement by evaluation, and density

def _refine(kind: torch.Tensor, unsure: torch.Tensor, mask: Expr, g: _Grid, tensors) -> tuple[torch.Tensor, int]:
    """Decide the unsure partial blocks by evaluating the mask on their positions, within REFINE_BUDGET."""
    from .lower_torch import evaluate
    partial = unsure.nonzero()
    n = partial.shape[0]
    area = g.bq * g.bk
    if n == 0 or n * area > REFINE_BUDGET:
        return kind, 0
    has_float = any(getattr(x, "dtype", None) is DType.FLOAT for x in walk(mask))
    float_dtypes = (torch.float32, torch.float64) if has_float else (torch.float32,)
    used = names_used(mask)
    kind = kind.clone()
    per = max(1, _REFINE_CHUNK // area)
    ar_q = torch.arange(g.bq, device=g.device)
    ar_k = torch.arange(g.bk, device=g.device)
    for start in range(0, n, per):
        blk = partial[start:start + per]
        bb, hh, qi, ki = blk.unbind(1)
        q = torch.clamp(qi.view(-1, 1, 1) * g.bq + ar_q.view(1, -1, 1), max=g.q_len - 1)
        k = torch.clamp(ki.view(-1, 1, 1) * g.bk + ar_k.view(1, 1, -1), max=g.kv_len - 1)
        names = {"b": bb.view(-1, 1, 1), "h": hh.view(-1, 1, 1), "q_idx": q, "kv_idx": k,
                 "q_len": torch.tensor(g.q_len, device=g.device), "kv_len": torch.tensor(g.kv_len, device=g.device)}
        names = {n_: v for n_, v in names.items() if n_ in used}
        all_true = some_true = None
        for fd in float_dtypes:
            val = evaluate(mask, names, tensors, fd, g.device)
            val = val.expand(blk.shape[0], g.bq, g.bk).reshape(blk.shape[0], -1)
            at, st = val.all(-1), val.any(-1)
            all_true = at if all_true is None else all_true & at
            some_true = st if some_true is None else some_true | st
        new = torch.where(all_true, 2, torch.where(some_true, 1, 0)).to(torch.int8)
        kind[bb, hh, qi, ki] = new
    return kind, n


def _density(kind: torch.Tensor, q_len: int, kv_len: int, bq: int, bk: int) -> float:
    """Real pairs in non-empty blocks / all real pairs, without a float copy of ``kind``: every block holds
    bq x bk pairs except those of the ragged last row and column of blocks; 0.0 where there is no pair (a length
    of 0): no pair needs computing."""
    if kind.numel() == 0:
        return 0.0
    per_row = torch.count_nonzero(kind, dim=-1)                          # [B, H, Qb]
    last_col = (kind[..., -1] != 0).to(torch.int64)                     # [B, H, Qb]
    Qb, Kb = kind.shape[2], kind.shape[3]
    k_last = kv_len - (Kb - 1) * bk
    kv_pairs = per_row * bk - last_col * (bk - k_last)                  # real kv columns per (b, h, q block)
    rows = torch.full((Qb,), bq, dtype=torch.int64, device=kind.device)
    rows[-1] = q_len - (Qb - 1) * bq
    # float64: at lengths near 2**62 the int64 products wrap (a causal mask of 2**40 read density 0)
    pairs = float((kv_pairs.double() * rows.double()).sum())
    return pairs / (float(q_len) * float(kv_len) * kind.shape[0] * kind.shape[1])
