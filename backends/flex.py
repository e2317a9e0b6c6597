"""The FlexAttention backend: a variant becomes a score_mod / mask_mod pair plus attnlang's analytic BlockMask,
run through ``torch.compile(flex_attention)``.

- score_mod / mask_mod are printed from the bound, simplified AST by ``attnlang.lower_torch.evaluate`` (the same
  dispatcher the eager reference uses), so both backends compute one function: tensor reads, Python-sign ``//``
  and ``%``, ``int()`` truncation.
- The BlockMask comes from ``attnlang.sparsity.mask_block_sparsity(...).to_flex(mask_mod=...)`` (never
  ``create_block_mask``) and is cached per (variant key, lengths, batch/heads, block size, identity and version of
  the tensors the mask reads).
- One compiled callable per (variant, shapes, dtypes, device, kernel options, ...): each gets its own code object,
  so Dynamo's per-code recompile limit is never reached by calling many variants, and calls with new tensors of
  the same shapes reuse it (q, k, v, the block-mask tensors and the named tensors are graph inputs). Inference
  calls at a second (q_len, kv_len) for the same key switch it to one graph dynamic in the sequence lengths
  (``q_len`` / ``kv_len`` then come from a small tensor, not constants), so decoding compiles at most two or
  three graphs, not one per step; an automatically chosen FLASH turns to TRITON there.
- FLASH on torch 2.11: ints are computed in int32 where interval analysis proves them exact (its code generator
  stores no int64; otherwise FLASH is not chosen automatically), its lse is rescaled (torch 2.11 multiplies it
  by ln 2 as if it were base 2), its backward takes no lse gradient (an lse that a loss uses raises
  AttnLangError in the backward) and, with gradients and GQA, k / v go in expanded (FA4's grouped backward gave
  NaN dq).
- Kernel (``kernel_options={"BACKEND": ...}``): on CUDA "FLASH" (flash_attn.cute, FlashAttention-4) where it fits
  (Hopper or newer, fp16/bf16, head dims 64/96/128, no gradients), else "TRITON"; a user's ``kernel_options``
  override. An automatically chosen FLASH that fails to compile falls back to TRITON once and is remembered.
- On the CPU (torch 2.11-2.13) compiled flex runs only inference without lse and in float32/bf16/fp16: calls that
  need lse, or float64, or were not asked to compile (``kernel_options={"CPU_COMPILED": True}``: that kernel
  cannot report a NaN score) run flex's unfused implementation
  (exact, materialises the [B, Hq, Sq, Skv] scores); calls needing gradients are refused (flex has no CPU
  backward).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
import sys
import types
import warnings
import weakref
from collections import OrderedDict

import torch

from ..ast import Binary, Call, Const, DType, Expr, Index, Op, Var, children, names_used, walk, with_children
from ..denominator import bad_score_hint, finish, lse_float32, raw_score_hint
from ..errors import AttnLangError
from ..lower_torch import evaluate, row_values
from ..memo import MEMO, IdentityMemo
from ..plan import CallPlan
from ..printer import to_source
from ..sparsity import mask_block_sparsity
from . import eager  # the reference, for the calls flex's kernels cannot give exactly

__all__ = ["attention", "unsupported", "option_problem", "kernel_for", "cache_info", "clear_caches", "BLOCK_SIZE",
           "FLASH_HEAD_DIMS"]

BLOCK_SIZE = (128, 128)              # (query rows, key columns) per BlockMask block: the flex kernels' tile
FLASH_HEAD_DIMS = (64, 96, 128)      # head dims the FLASH (FlashAttention-4) kernel is chosen for automatically
_UNFUSED_BUDGET = 1 << 27            # score elements the unfused (CPU lse / float64) path may materialise
_MAX_COMPILED = 256                  # compiled callables kept (LRU); each distinct variant x shapes holds one
_MAX_BLOCK_MASKS = 64                # block masks kept (LRU)
_RECOMPILE_LIMIT = 64                # Dynamo's per-code-object limit, raised once, for stride / grad-mode changes

_compiled: "OrderedDict[tuple, object]" = OrderedDict()
_block_masks: "OrderedDict[tuple, tuple]" = OrderedDict()  # -> (BlockMask, weakrefs to its mask tensors)
_flash_failed: dict[tuple, str] = {}
_first_lengths: "OrderedDict[tuple, tuple]" = OrderedDict()  # key without lengths -> the first (q_len, kv_len)
_flash_lengths: dict[tuple, tuple] = {}  # automatic FLASH: variant and shape class -> the first lengths
_stats = {"compiled": 0, "graphs": 0, "block_masks": 0, "flash_fallbacks": 0, "tile_retries": 0,
          "non_finite_v": 0}


# ---------------------------------------------------------------------------------------------------------------
# what can run where

def _grad_needed(q, k, v, plan: CallPlan) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (q, k, v, *plan.tensors.values()))


def _named_grad(plan: CallPlan) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in plan.tensors.values())


def _want_lse(plan: CallPlan) -> bool:
    # Compiled CPU flex returns no lse and cannot report a NaN score (it writes 0 there), so a CPU call takes it
    # only when asked (kernel_options={"CPU_COMPILED": True}) and the plan needs no lse.
    if not (plan.options or {}).get("CPU_COMPILED"):
        return True
    return (bool(getattr(plan, "return_lse", True)) or plan.lse_shift is not None or plan.sink is not None
            or not plan.normalize)  # the denominator's corrections are computed from lse


@functools.lru_cache(maxsize=1)
def _flash_importable() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA toolchain raising at import
        return False
    return True


_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT32_OK = IdentityMemo()


def _ints_fit_int32(plan: CallPlan) -> bool:
    """Whether every int value of the score and mask provably fits in int32 for this call (interval analysis over
    plan.value_ranges): then the mods compute ints in int32, which the FLASH kernel's code generator requires (it
    cannot store int64). Cached per bound expressions and value ranges."""
    def compute():
        from ..intervals import bounds
        for expr in (plan.score, plan.mask):
            for node in walk(expr):
                if node.dtype is DType.INT:
                    r = bounds(node, plan.value_ranges)
                    if not (_INT32[0] <= r.lo and r.hi <= _INT32[1]):
                        return False
        return True
    return _INT32_OK.get((plan.score, plan.mask), tuple(plan.value_ranges.items()), compute)


@functools.lru_cache(maxsize=1)
def _flash_lse_scaled_by_ln2() -> bool:
    """torch 2.11's flex_attention multiplies every kernel's lse by ln 2 (the Triton kernels' lse is base 2), also
    the FLASH kernel's, which is already natural-log (seen on the H200: lse = true lse x 0.693); later versions
    know which kernels return base-2 statistics (``stats_are_log2``). True where the FLASH lse must be undone."""
    import inspect

    import torch.nn.attention.flex_attention as flex_module
    try:
        return "stats_are_log2" not in inspect.getsource(flex_module)
    except (OSError, TypeError):  # no source: assume the fixed behaviour
        return False


def _flash_fits(q, plan: CallPlan, dv: int, grads: bool) -> str | None:
    """None if the FLASH kernel suits this CUDA call, else why not."""
    if torch.cuda.get_device_capability(q.device) < (9, 0):
        return "FLASH needs Hopper (sm90) or newer"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FLASH takes float16/bfloat16, not {q.dtype}"
    if q.shape[-1] not in FLASH_HEAD_DIMS or dv != q.shape[-1]:
        return f"FLASH is chosen for head dims {FLASH_HEAD_DIMS} with Dv == D, got D={q.shape[-1]}, Dv={dv}"
    if grads:
        # The FLASH backward does not take gradients to captured tensors and is young; TRITON is the safe default
        # for training. kernel_options={"BACKEND": "FLASH"} still forces it.
        return "FLASH is chosen automatically for inference only"
    if not _flash_importable():
        return "flash_attn.cute (flash-attn-4) is not importable"
    if not _ints_fit_int32(plan):
        return "an int value may leave int32 here, and the FLASH kernel computes ints in int32"
    if _has_shift(plan):
        return "FLASH's code generator cannot compile integer shifts (>>, <<); TRITON runs this call"
    if _has_floor_division(plan):
        # GPU matrix (benchmarks/results/gpu_run1/gpu_matrix.json, H200, torch 2.11): FLASH forward of
        # `(q_idx - kv_idx) % 5 != 2` was wrong at head dims 64, 96 and 128 (max rel. error 0.43-1.11) where TRITON
        # and the fa4 backend were right: FLASH's code generator does not keep Python's signs for % and //
        return "FLASH's code generator gets % and // of negative ints wrong (GPU matrix); TRITON runs this call"
    return None


def _has_floor_division(plan: CallPlan) -> bool:
    return _has_op(plan, (Op.MOD, Op.FLOORDIV))


def _has_shift(plan: CallPlan) -> bool:
    return _has_op(plan, (Op.LSHIFT, Op.RSHIFT))


def _has_op(plan: CallPlan, ops: tuple) -> bool:
    exprs = [plan.score, plan.mask] + ([plan.sink] if getattr(plan, "sink", None) is not None else [])
    return any(isinstance(n, Binary) and n.op in ops for e in exprs for n in walk(e))


def _flash_key(plan: CallPlan, q) -> tuple:
    # without the lengths: a FLASH compile that failed at one length is not retried at every decoding step
    return (plan.key, q.shape[0], q.shape[1], q.shape[3], q.dtype, str(q.device))


def kernel_for(q, plan: CallPlan, dv: int | None = None, grads: bool = False) -> str | None:
    """The flex kernel (kernel_options["BACKEND"]) this call uses: plan.options' choice, else "FLASH" or "TRITON"
    on CUDA, None (flex's own choice) elsewhere."""
    chosen = plan.options.get("BACKEND") if plan.options else None
    if chosen is not None:
        return str(chosen)
    if q.device.type != "cuda":
        return None
    dv = q.shape[-1] if dv is None else dv
    if _flash_fits(q, plan, dv, grads) is None:
        if _flash_key(plan, q) not in _flash_failed:
            return "FLASH"
    return "TRITON"


def _known_options() -> frozenset:
    """kernel_options keys flex takes: torch's FlexKernelOptions (also with its ``fwd_`` / ``bwd_`` prefixes) and
    attnlang's own CPU_COMPILED; None where torch does not list them (every key is passed on then)."""
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:  # pragma: no cover - torch without the TypedDict
        return None
    names = set(getattr(FlexKernelOptions, "__annotations__", {}))
    return frozenset(names | {f"{p}{n}" for p in ("fwd_", "bwd_") for n in names} | {"CPU_COMPILED"})


def option_problem(options) -> str | None:
    """None when every kernel_options key is one flex takes, else which are not (with the known keys)."""
    known = _known_options()
    unknown = sorted(str(k) for k in (options or {}) if known is not None and k not in known)
    if unknown:
        listed = ", ".join(sorted(n for n in known if not n.startswith(("fwd_", "bwd_"))))
        return (f"unknown kernel_options for backend 'flex': {', '.join(map(repr, unknown))}; expected some of "
                f"{listed} (FlexAttention's, also with fwd_ / bwd_ prefixes)")
    return value_problem(options)


@functools.lru_cache(maxsize=1)
def _kernel_names() -> tuple:
    """The values kernel_options["BACKEND"] may take (torch's _Backend literal); () where torch does not say."""
    try:
        import typing

        from torch.nn.attention.flex_attention import _Backend
        return typing.get_args(_Backend)
    except ImportError:  # pragma: no cover - a torch without the literal
        return ()


@functools.lru_cache(maxsize=1)
def _option_types() -> dict:
    """The int / bool kernel_options of FlexKernelOptions (also with fwd_ / bwd_ prefixes) and CPU_COMPILED, by
    the type torch gives them; {} where torch does not say."""
    try:
        import typing

        from torch.nn.attention.flex_attention import FlexKernelOptions
        hints = typing.get_type_hints(FlexKernelOptions)
    except (ImportError, NameError, TypeError):  # pragma: no cover - a torch without the TypedDict
        hints = {}
    kinds = {n: t for n, t in hints.items() if t in (int, bool)}
    return {**kinds, **{f"{p}{n}": t for p in ("fwd_", "bwd_") for n, t in kinds.items()}, "CPU_COMPILED": bool}


def value_problem(options) -> str | None:
    """None unless kernel_options["BACKEND"] names no flex kernel, or an int / bool option (FlexKernelOptions'
    types; tile sizes, num_warps and num_stages positive) has a value of another kind: checked before any backend
    runs, so "auto" (which may run another backend, which ignores it) does not take a misspelt kernel silently, and
    the CPU (whose kernel ignores the tile sizes) refuses the BLOCK_M="64" a GPU's Triton would fail on."""
    names = _kernel_names()
    kernel = (options or {}).get("BACKEND")
    if kernel is not None and names and kernel not in names:
        return f"kernel_options['BACKEND'] must be one of {', '.join(map(repr, names))}; got {kernel!r}"
    for key, value in (options or {}).items():
        kind = _option_types().get(key)
        if kind is None or value is None:
            continue
        if kind is bool and not isinstance(value, bool):
            return f"kernel_options[{key!r}] must be True or False; got {value!r}"
        if kind is int:
            positive = key.removeprefix("fwd_").removeprefix("bwd_").startswith(("BLOCK_", "num_"))
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < int(positive):
                return f"kernel_options[{key!r}] must be a{' positive' if positive else 'n'} int; got {value!r}"
    return None


def unsupported(q, plan: CallPlan) -> str | None:
    """None if flex can run this call here, else the reason (shown by ``backend="auto"`` and in errors)."""
    bad = option_problem(plan.options)
    if bad:
        return bad
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch >= 2.5 has it
        return f"torch.nn.attention.flex_attention is not importable: {e}"
    dev = q.device.type
    D = q.shape[-1]
    named_grad = _named_grad(plan)
    if dev == "cpu":
        if torch.is_grad_enabled() and (q.requires_grad or named_grad):
            return ("FlexAttention has no backward pass on the CPU (torch raises NotImplementedError); use "
                    "backend='eager' for gradients on the CPU")
        unfused = _want_lse(plan) or q.dtype == torch.float64
        if unfused:
            n = plan.batch * plan.q_heads * plan.q_len * plan.kv_len
            if n > _UNFUSED_BUDGET:
                why = "lse" if q.dtype != torch.float64 else "float64"
                return (f"on the CPU, flex with {why} runs only unfused and would materialise {n} scores "
                        f"(limit {_UNFUSED_BUDGET}); use backend='eager'")
        return None
    if dev != "cuda":
        return f"attnlang's flex backend runs on CPU and CUDA, not {dev}"
    if q.dtype == torch.float64:
        return "FlexAttention's GPU kernels take float16, bfloat16 or float32, not float64"
    if D < 16:
        return f"FlexAttention's GPU kernels need head dim >= 16, got {D}"
    kernel = kernel_for(q, plan, grads=torch.is_grad_enabled() and (q.requires_grad or named_grad))
    if kernel == "FLASH":
        if named_grad:
            return ("kernel FLASH cannot give gradients to tensors bound by name (flex's FLASH backward: captured "
                    "grads NYI); use kernel_options={'BACKEND': 'TRITON'}")
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"kernel FLASH takes float16/bfloat16, not {q.dtype}"
        if _has_shift(plan):
            # H200, torch 2.11 (benchmarks/results/gpu_suite_s4): FLASH's CuTeDSL code generator fails to compile
            # `q_idx >> 4` ("Unsupported DSL type: vector<1xi1>"); its // of negative ints is wrong, so no rewrite
            return ("kernel FLASH cannot compile integer shifts (>>, <<): its code generator fails on them; use "
                    "kernel_options={'BACKEND': 'TRITON'}")
        if (plan.sink is not None or not plan.normalize) and torch.is_grad_enabled() and q.requires_grad:
            return ("kernel FLASH cannot differentiate lse, which a sink or normalize=False is computed from; use "
                    "kernel_options={'BACKEND': 'TRITON'}")
        if plan.options.get("BACKEND") == "FLASH" and not _flash_importable():
            return "kernel FLASH needs flash_attn.cute (flash-attn-4), which is not importable"
    return None


# ---------------------------------------------------------------------------------------------------------------
# generated score_mod / mask_mod

def _slug(plan: CallPlan) -> str:
    """A Python identifier naming the generated code after the canonical expression."""
    text = " ".join(plan.key)
    word = "".join(c if c.isalnum() else "_" for c in text)[:40].strip("_")
    return f"{word}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _is_plain_score(expr: Expr) -> bool:
    return isinstance(expr, Var) and expr.name == "score"


def _is_true(expr: Expr) -> bool:
    return isinstance(expr, Const) and expr.dtype is DType.BOOL and expr.value is True


_GRID = frozenset({"b", "h", "q_idx", "kv_idx"})


_MAX_PRODUCT_POWER = 64


def _small_integral(c: Expr) -> int | None:
    """n when ``c`` is a literal integer (or integral float) exponent 0 <= n <= 64, else None."""
    if not isinstance(c, Const) or c.dtype not in (DType.INT, DType.FLOAT) or isinstance(c.value, bool):
        return None
    value = c.value
    if not math.isfinite(value) or value != int(value) or not 0 <= value <= _MAX_PRODUCT_POWER:
        return None
    return int(value)


def _power_as_products(x: Expr, n: int, dtype: DType, tied) -> Expr:
    """``x ** n`` for a literal n >= 0 as products by repeated squaring (x ** 5 = (x*x)*(x*x)*x), computed in
    ``dtype``. Inductor lowers an int ** int to an extern kernel, which a mod's pointwise subgraph cannot hold
    ("Buffers cannot be created while lowering a pointwise subgraph", TRITON and compiled CPU flex); products
    lower everywhere. Same value: ints exactly (the checker proved no overflow), floats within an ulp per step."""
    if n == 0:
        return tied(Const(1 if dtype is DType.INT else 1.0, dtype))
    if x.dtype is not dtype:  # an int base of a float power: converted once, as evaluate would
        x = Call("float", (x,), dtype=DType.FLOAT)

    def power(m: int) -> Expr:
        if m == 1:
            return x
        half = power(m // 2)
        square = Binary(Op.MUL, half, half, dtype=dtype)
        return Binary(Op.MUL, square, x, dtype=dtype) if m % 2 else square

    return power(n)


def _prepare(expr: Expr, q_len: int, kv_len: int, fd: torch.dtype, fold_lengths: bool = True) -> Expr:
    """The expression as the mods evaluate it: the same values, friendlier to flex's tracing.

    - Every subexpression of literals, ``q_len`` and ``kv_len`` only is folded into one literal (with this call's
      lengths, by ``evaluate`` itself, so the value is the one eager computes).
    - ``t[c]`` becomes ``t[c + 0 * q_idx]`` for every index c that depends on no position; ``x ** n`` for a
      literal integral n in [0, 64] becomes products (``_power_as_products``), and any other literal operand of
      ``**`` becomes ``c + 0 * q_idx``.
    Tracing specialises constant-only ops and reads at constant indices, leaving dead constant tensors in the
    mod's graph, which compiled CPU flex cannot lower (torch 2.13: "'Tensor' object has no attribute
    'get_dtype'"). Expressions are at most a hundred levels deep (the parser's limit), so recursion is fine.
    With ``fold_lengths=False`` (a callable compiled for every length) ``q_len`` and ``kv_len`` stay names.
    """
    lengths = {"q_len": torch.tensor(q_len), "kv_len": torch.tensor(kv_len)} if fold_lengths else {}

    def constant_only(node: Expr) -> bool:
        return all(isinstance(n, Const) or (isinstance(n, Var) and n.name in lengths) or
                   (not isinstance(n, (Var, Index)) and bool(children(n))) for n in walk(node))

    def fold(node: Expr) -> Const:
        value = evaluate(node, lengths, {}, fd, torch.device("cpu"))
        v = bool(value) if node.dtype is DType.BOOL else int(value) if node.dtype is DType.INT else float(value)
        return Const(v, node.dtype)

    def anchor(ix: Expr) -> Expr:
        if names_used(ix) & _GRID:
            return ix
        zero = Binary(Op.MUL, Const(0, DType.INT), Var("q_idx", dtype=DType.INT), dtype=DType.INT)
        return Binary(Op.ADD, ix, zero, dtype=DType.INT)

    def tied(c: Expr) -> Expr:
        zero = Binary(Op.MUL, Const(0, DType.INT), Var("q_idx", dtype=DType.INT), dtype=DType.INT)
        return Binary(Op.ADD, c, zero, dtype=c.dtype)

    def visit(node: Expr) -> Expr:
        if isinstance(node, Const):
            return node
        if constant_only(node):
            return fold(node)
        if isinstance(node, Index):
            return with_children(node, tuple(anchor(visit(ix)) for ix in node.indices))
        if isinstance(node, Binary) and node.op is Op.POW:
            left, right = visit(node.left), visit(node.right)
            n = _small_integral(right)
            if n is not None:
                return _power_as_products(left, n, node.dtype, tied)
            # tracing specialises pow at a literal (x ** 2 -> x * x) and leaves the literal dead
            return with_children(node, tuple(tied(c) if isinstance(c, Const) else c for c in (left, right)))
        kids = children(node)
        return with_children(node, tuple(visit(c) for c in kids)) if kids else node

    return visit(expr)


def _mods(score: Expr, mask: Expr, names: tuple[str, ...], values, q_len: int, kv_len: int, fd: torch.dtype,
          tie_to_score: bool = False, int_dtype: torch.dtype = torch.int64, lengths=None, code_key=None,
          full_consts: bool = False):
    """score_mod and mask_mod of ``_prepare``-d expressions over the tensors ``values`` (bound by ``names``):
    closures over the caller's own arguments, so inside a compiled function the tensors are graph inputs, not
    constants.

    tie_to_score: add ``0 * score`` to a score expression that ignores the score. Compiled CPU flex (torch 2.13)
    returns wrong values for a score_mod whose result does not depend on the score, the FLASH kernel's code
    generator rejects a constant score ("Expected TensorSSA") and TRITON's backward has no joint graph for it
    (torch 2.11, H200); the score is finite there (q and k are), so the term is exactly 0.
    int_dtype: the dtype ints are computed in (int32 only where ``_ints_fit_int32`` proved it exact).
    lengths: a [2] int tensor (q_len, kv_len) read by the mods instead of the constants q_len / kv_len (a callable
        compiled for every length).
    code_key: when given (``_code_key``; mods built outside a traced function), each mod gets a code object of its
        own for that key (``_own_code``).
    full_consts: literals and lengths built with torch.full (an op of the traced graph) rather than torch.tensor
        (a lifted constant tensor, which TRITON's pointwise-subgraph lowering can meet as a plain tensor: "'Tensor'
        object has no attribute 'get_dtype'"); FLASH keeps torch.tensor, the form its code generator was run with.
    """
    tensors = dict(zip(names, values))

    def length(value, dev):
        if full_consts:
            return torch.full((), value, device=dev, dtype=int_dtype)
        return torch.tensor(value, device=dev, dtype=int_dtype)
    used_s, used_m = names_used(score), names_used(mask)
    tie = tie_to_score and "score" not in used_s

    def grid(dev, used, b, h, q_idx, kv_idx):
        out = {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx}
        # lengths are read at an index tied to q_idx: FLASH's code generator cannot index at a literal
        # ("Expected TensorSSA, but got int"), the same reason _prepare anchors constant indices
        if "q_len" in used:
            out["q_len"] = length(q_len, dev) if lengths is None else lengths[q_idx * 0]
        if "kv_len" in used:
            out["kv_len"] = length(kv_len, dev) if lengths is None else lengths[q_idx * 0 + 1]
        return out

    score_mod = None
    if not _is_plain_score(score):
        def score_mod(s, b, h, q_idx, kv_idx):
            names_ = grid(s.device, used_s, b, h, q_idx, kv_idx)
            names_["score"] = s
            # float32 (float64 for float64 inputs) whatever s's dtype: compiled CPU flex miscomputes a score_mod
            # that casts back to bf16/fp16 (torch 2.13), and every kernel accumulates scores in float32 anyway
            # guard_branches: flex's backward is this function's autograd, where an unchosen where branch's NaN
            # derivative (sqrt of a negative score), or an unchosen min / max / clamp operand's (1 / score at 0 in
            # min(1.0 / score, 10.0)), would reach the score
            out = evaluate(score, names_, tensors, fd, s.device, int_dtype, full_consts, guard_branches=True)
            return out + s.to(fd) * 0.0 if tie else out

    def mask_mod(b, h, q_idx, kv_idx):
        return evaluate(mask, grid(q_idx.device, used_m, b, h, q_idx, kv_idx), tensors, fd, q_idx.device,
                        int_dtype, full_consts)

    if code_key is not None:
        score_mod = None if score_mod is None else _own_code(score_mod, "score_mod", code_key)
        mask_mod = _own_code(mask_mod, "mask_mod", code_key)
    return score_mod, mask_mod


def _code_key(score: Expr, mask: Expr, names: tuple[str, ...], q_len: int, kv_len: int, fd: torch.dtype,
              tie_to_score: bool, int_dtype: torch.dtype, any_length: bool) -> tuple:
    """Everything the mods of ``_mods`` compute from besides the tensors' values: the expressions in canonical text
    with every node's type, the tensor names, dtypes, the tie, and the lengths they fold in (callers add any
    further option of ``_mods``, such as ``full_consts``)."""
    def typed(expr: Expr) -> tuple:
        return to_source(expr), tuple(n.dtype for n in walk(expr))
    return (typed(score), typed(mask), names, None if any_length else (q_len, kv_len), str(fd), str(int_dtype),
            tie_to_score)


_CODES: dict[tuple, types.CodeType] = {}  # (mod kind, _code_key) -> its code object, kept for the process


def _own_code(fn, kind: str, key: tuple):
    """``fn`` with the code object of ``key``: one per distinct expression, kept alive for the process.

    Flex's unfused (eager) path compiles one shared wrapper (``_flex_attention_hop_wrapper``) with Dynamo, whose
    cache tells score_mod / mask_mod apart only by the guards it installs on their code and closures; those
    guards missed the comparison at the top of a mask (torch 2.13: ``kv_idx < pre[0]`` then ``kv_idx >=
    pre[0]`` gave the first variant's result). Dynamo always guards a function's code object by identity, so a
    code object per expression keys its cache by the expression; keeping them alive keeps an id from being reused.
    """
    full = (kind,) + key
    code = _CODES.get(full)
    if code is None:
        name = f"{kind}_{hashlib.sha1(repr(full).encode()).hexdigest()[:16]}"
        code = fn.__code__.replace(co_name=name)
        if hasattr(code, "co_qualname"):
            code = code.replace(co_qualname=name)
        _CODES[full] = code
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# ---------------------------------------------------------------------------------------------------------------
# block masks

def _block_mask(q, plan: CallPlan, mask_names: tuple[str, ...], fd):
    """The analytic BlockMask (cached) and its mask_mod over the current tensors."""
    mask_tensors = {n: plan.tensors[n] for n in mask_names}
    ident = tuple((n, MEMO.token(t), tuple(t.shape), t.dtype) for n, t in mask_tensors.items())
    key = (plan.key, plan.q_len, plan.kv_len, plan.batch, plan.q_heads, BLOCK_SIZE, str(q.device),
           ident)
    hit = _block_masks.get(key)
    if hit is not None:
        _block_masks.move_to_end(key)
        return hit[0]
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise AttnLangError("backend 'flex' inside a CUDA graph (capture, or torch.compile mode='reduce-overhead') "
                            "needs this call's BlockMask built ahead: call the variant once outside the graph with "
                            "the same shapes and tensors first (building it copies block tables from the host)")
    prepared = _prepare(plan.mask, plan.q_len, plan.kv_len, fd)
    detached = {n: t.detach() for n, t in mask_tensors.items()}  # a mask carries no gradient
    _, mask_mod = _mods(plan.score, prepared, mask_names, tuple(detached.values()), plan.q_len, plan.kv_len, fd)
    # the tensors go in as a mapping: a tensor may be named like an argument (batch, device, ...)
    bs = mask_block_sparsity(plan.mask, plan.checked.tensors, plan.checked.sources, plan.q_len, plan.kv_len,
                             plan.batch, plan.q_heads, BLOCK_SIZE, detached)
    bm = bs.to_flex(mask_mod=mask_mod, device=q.device)
    if not _in_graph_pool(q.device):
        def gone(_, key=key):  # a mask tensor was freed: its block mask (whose mask_mod holds its memory) goes too
            _block_masks.pop(key, None)
        _block_masks[key] = (bm, [weakref.ref(t, gone) for t in mask_tensors.values()])
    _stats["block_masks"] += 1
    while len(_block_masks) > _MAX_BLOCK_MASKS:
        _block_masks.popitem(last=False)
    return bm


def _block_tensors(bm) -> tuple:
    return (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.q_num_blocks,
            bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)


# ---------------------------------------------------------------------------------------------------------------
# the flex call, compiled once per key

def _make_body(plan: CallPlan, names: tuple[str, ...], fd, kernel_options, want_lse: bool, gqa: bool, block_size,
               tie_to_score: bool, int_dtype: torch.dtype, detach_lse: bool, any_length: bool, traced: bool):
    """f(q, k, v, lengths, *block_mask_tensors, *named) -> (out, lse or None), building its mods from its own
    arguments. any_length: the lengths come from q / k's shapes and the ``lengths`` tensor, never from constants,
    so one compiled graph (dynamic in the sequence dims) serves every length; else ``lengths`` is None.
    traced: the body runs inside torch.compile (its own code object per key, ``_renamed``); else it runs eagerly
    and flex compiles the mods itself, so they get code objects of their own (``_own_code``)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # pragma: no cover - older torch: return_lse only
        AuxRequest = None
    q_len, kv_len, scale = plan.q_len, plan.kv_len, plan.scale
    # prepared here, outside the traced function: folding evaluates on the host
    fold = not any_length
    score, mask = _prepare(plan.score, q_len, kv_len, fd, fold), _prepare(plan.mask, q_len, kv_len, fd, fold)
    options = dict(kernel_options) if kernel_options else None
    full_consts = (options or {}).get("BACKEND") != "FLASH"
    code_key = None if traced else _code_key(score, mask, names, q_len, kv_len, fd, tie_to_score, int_dtype,
                                             any_length) + (full_consts,)

    def body(q, k, v, lengths, kv_num, kv_idx, full_num, full_idx, q_num, q_idx_, full_q_num, full_q_idx, *named):
        score_mod, mask_mod = _mods(score, mask, names, named, q_len, kv_len, fd, tie_to_score, int_dtype, lengths,
                                    code_key, full_consts)
        seq_lengths = (q_len, kv_len) if lengths is None else (q.shape[2], k.shape[2])
        bm = BlockMask(seq_lengths, kv_num, kv_idx, full_num, full_idx, q_num, q_idx_, full_q_num, full_q_idx,
                       BLOCK_SIZE=block_size, mask_mod=mask_mod)
        kwargs = dict(score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=options)
        if not want_lse:
            return flex_attention(q, k, v, **kwargs), None
        if AuxRequest is not None:
            out, lse = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
            lse = lse.lse
        else:
            out, lse = flex_attention(q, k, v, return_lse=True, **kwargs)
        # FLASH's backward cannot take a gradient of lse: none is asked for (attention() guards the lse it returns)
        return out, (lse.detach() if detach_lse else lse)

    return body


def _renamed(fn, name: str):
    """A copy of ``fn`` with its own code object named ``name``: Dynamo caches (and counts recompiles) per code
    object, so every distinct key gets a fresh budget and the generated code reads as its variant in traces."""
    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    out = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return out


def _counting_inductor(gm, example_inputs):
    """Inductor, counting the graphs Dynamo hands it: cache_info()["graphs"] rises on every (re)compile."""
    from torch._dynamo.backends.registry import lookup_backend
    _stats["graphs"] += 1
    return lookup_backend("inductor")(gm, example_inputs)


def _raise_limits() -> None:
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr) and getattr(cfg, attr) < _RECOMPILE_LIMIT:
            setattr(cfg, attr, _RECOMPILE_LIMIT)


def _callable(q, k, v, plan: CallPlan, names, named, fd, kernel, compiled: bool, want_lse: bool, bm,
              tiles: dict | None = None):
    """(fn, any_length): the compiled flex call for this key, and whether it is the one compiled for every length.

    The first length pair seen for a key gets a graph specialised to it (training: one length, fastest code). A
    second length pair for the same key (decoding: kv_len grows by one per step; prefill of varying prompts)
    switches the key to one graph dynamic in the sequence dims, compiled once and reused for every length
    (inference calls on TRITON / the CPU kernel; calls with gradients and explicit FLASH stay per length)."""
    kernel_options = {key: value for key, value in (plan.options or {}).items() if key != "CPU_COMPILED"}
    kernel_options.pop("BACKEND", None)
    for key, value in (tiles or {}).items():  # smaller tiles after "out of resource"; a user's own keys win
        kernel_options.setdefault(key, value)
    if kernel is not None:
        kernel_options["BACKEND"] = kernel
    gqa = q.shape[1] != k.shape[1]
    flash = kernel == "FLASH"
    int_dtype = torch.int32 if flash and _ints_fit_int32(plan) else torch.int64
    detach_lse = flash and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *named))
    lengths = (plan.q_len, plan.kv_len)

    def shape(t):  # a shape with the sequence lengths left out
        return tuple(-1 if d in lengths else d for d in t.shape)

    base = (int_dtype, detach_lse, plan.key, shape(q), shape(k), shape(v), q.dtype, str(q.device),
            tuple((n, shape(t), t.dtype, t.requires_grad) for n, t in zip(names, named)),
            tuple(sorted((str(a), repr(b)) for a, b in kernel_options.items())), plan.scale, compiled, want_lse,
            bm.full_kv_num_blocks is None, torch.is_grad_enabled(), q.requires_grad, k.requires_grad,
            v.requires_grad, tuple(bm.BLOCK_SIZE))
    first = _first_lengths.setdefault(base, lengths)
    # FLASH's code generator (torch 2.11) cannot read the lengths tensor ("Expected TensorSSA, but got int", H200):
    # an explicitly asked-for FLASH compiles per length; an automatic one turns to TRITON (attention())
    # Only without gradients: the dynamic graph's backward has not run on a GPU here (training mostly repeats one
    # length anyway); with gradients every length keeps its own specialised graph, as before.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *named))
    any_length = compiled and first != lengths and not flash and not needs_grad
    key = (base, None) if any_length else (base, lengths, tuple(bm.kv_num_blocks.shape), tuple(q.shape),
                                            tuple(k.shape), tuple((tuple(t.shape) for t in named)))
    fn = _compiled.get(key)
    if fn is not None:
        _compiled.move_to_end(key)
        return fn, any_length
    body = _make_body(plan, names, fd, kernel_options or None, want_lse, gqa, tuple(bm.BLOCK_SIZE),
                      tie_to_score=compiled, int_dtype=int_dtype, detach_lse=detach_lse, any_length=any_length,
                      traced=compiled)
    if compiled:
        _raise_limits()
        fn = torch.compile(_renamed(body, f"flex_{_slug(plan)}" + ("_any_length" if any_length else "")),
                           backend=_counting_inductor, dynamic=None if any_length else False, fullgraph=True)
        _stats["compiled"] += 1
    else:
        fn = body
    _compiled[key] = fn
    while len(_compiled) > _MAX_COMPILED:
        _compiled.popitem(last=False)
    while len(_first_lengths) > 4 * _MAX_COMPILED:
        _first_lengths.pop(next(iter(_first_lengths)))
    return fn, any_length


def _mark_lengths_dynamic(lengths: tuple[int, int], q, k, v, block_tensors, named) -> None:
    """Let Dynamo treat the sequence dims of q / k / v, the block-count dims of the BlockMask tensors and the dims
    of named tensors that hold a sequence length as dynamic (a graph compiled for every length). ``maybe_``: a dim
    the graph needs specialised (or of size 0 / 1, Dynamo's rule) just stays static."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t in (q, k, v):
        mark(t, 2)
    for t in block_tensors:  # [B, H, blocks] counts and [B, H, blocks, blocks] indices
        if t is not None:
            for dim in range(2, t.dim()):
                mark(t, dim)
    for t in named:
        for dim, size in enumerate(t.shape):
            if size in lengths:
                mark(t, dim)


# Smaller Triton tiles, tried in turn when a kernel needs more shared memory than the GPU has ("out of resource:
# shared memory", H200 at head dim 64 with gradients to a [Sq, Skv] bias: Required 245760, limit 232448). BLOCK_M /
# BLOCK_N are the forward's tiles, BLOCK_M1 / BLOCK_N1 / BLOCK_M2 / BLOCK_N2 the backward's (dK/dV and dQ loops;
# BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0, all dividing the 128-token BlockMask block), num_stages
# the software pipeline depth; torch.nn.attention.flex_attention.FlexKernelOptions, torch 2.11-2.13.
SMALLER_TILES = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
     "num_stages": 2, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16,
     "num_stages": 1, "num_warps": 4},
)
_FORWARD_TILE_KEYS = ("BLOCK_M", "BLOCK_N")
_tile_level: dict = {}  # (variant, shape class, grads) -> index into SMALLER_TILES that last worked
_backward_compiled: set = set()  # (variant, shape class, tiles) whose TRITON backward has compiled and run


def _tiles_key(plan: CallPlan, q, grads: bool) -> tuple:
    return (*_flash_key(plan, q), grads)


def _out_of_resource(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is Triton's "out of resource" (shared memory, registers)."""
    seen = 0
    while e is not None and seen < 8:
        text = f"{type(e).__name__}: {e}"
        if "out of resource" in text.lower() or "OutOfResources" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _run_with_smaller_tiles(run, kernel, key, q_len: int):
    """``run(kernel, tiles)`` -> (out, lse, kernel), first with the kernel's own tiles (or those that worked last
    time for ``key``), then with each smaller entry of SMALLER_TILES while Triton runs out of resources. FLASH has
    no such options; a short query (q_len < 128, flex's decoding kernel, whose BLOCK_M covers the grouped query
    rows) keeps its forward tiles."""
    level = _tile_level.get(key, -1) if kernel != "FLASH" else -1
    while True:
        tiles = None
        if level >= 0:
            tiles = dict(SMALLER_TILES[level])
            if q_len < 128:
                for name in _FORWARD_TILE_KEYS:
                    tiles.pop(name)
        try:
            out, lse = run(kernel, tiles)
        except AttnLangError:
            raise
        except Exception as e:
            if kernel == "FLASH" or level + 1 >= len(SMALLER_TILES) or not _out_of_resource(e):
                raise
            level += 1
            _stats["tile_retries"] += 1
            continue
        if level >= 0:
            _tile_level[key] = level
        return out, lse, kernel


def _compile_backward_now(out: torch.Tensor, inputs, key) -> None:
    """Run this graph's backward once, with a zero upstream gradient and the graph kept, the first time a key is
    seen. AOTAutograd compiles the backward lazily, so a Triton backward that runs out of shared memory (H200,
    head dim 128, gradients to a [Sq, Skv] bias: "Required: 233472, Hardware limit: 232448",
    benchmarks/results/gpu_run1) would otherwise fail in the caller's ``backward()``, where no smaller tiles can be
    tried. Here it fails inside ``_run_with_smaller_tiles``, which retries with SMALLER_TILES; the caller's backward
    then reuses the compiled kernel. Costs one backward per (variant, shape class, tiles), not per call."""
    if key in _backward_compiled:
        return
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if leaves and out.requires_grad:
        try:
            torch.autograd.grad(out, leaves, grad_outputs=torch.zeros_like(out), retain_graph=True,
                                allow_unused=True)
        except RuntimeError as e:
            # AOTAutograd refuses a kept graph ("compiled with non-empty donated buffers") only where this
            # backward was compiled already (a lazy compile under retain_graph donates nothing), and before it
            # runs any of it: what the warm-up is for is done (H200, alibi_learned-flex under an outer compile)
            if "donated buffer" not in str(e):
                raise
    _backward_compiled.add(key)


def _kernel_failure(kernel, e: BaseException):
    """The KernelFailure for a flex kernel that failed to compile or launch (``backend="auto"`` moves on)."""
    from . import KernelFailure
    what = f"kernel {kernel}" if kernel else "FlexAttention"
    text = str(e).strip()
    return KernelFailure(f"backend 'flex': {what} failed on this call: {type(e).__name__}: "
                         f"{text.splitlines()[0] if text else ''}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for one checked call through FlexAttention.

    Args:
        q: [B, Hq, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv]; one device. CUDA: float16/bfloat16/float32;
            CPU: float32/bfloat16/float16 compiled (inference without lse), any float dtype unfused.
        plan: the bound, simplified expressions, scale, named tensors and options (``attnlang.plan.CallPlan``);
            plan.options are flex kernel_options ({"BACKEND": "TRITON" | "FLASH" | ...} picks the kernel).
    Returns:
        out [B, Hq, Sq, Dv] in q's dtype; lse [B, Hq, Sq] float32 (float64 when q is float64), natural log, -inf
        for rows with no allowed key
        (zeros of that shape on the compiled CPU path when the plan asks for no lse).
    Raises:
        AttnLangError: ``unsupported`` gives a reason; the kernel asked for in kernel_options fails to compile;
            the score is NaN or +inf at an allowed position; the sink is NaN or +inf.

    A sink and normalize=False are applied to flex's (out, lse) by ``attnlang.denominator.finish`` (flex itself
    has no sink), differentiably, so on TRITON gradients reach q, k, v and the sink's tensors.
    """
    why = unsupported(q, plan)
    if why is not None:
        raise AttnLangError(f"backend 'flex' cannot run this call: {why}")
    fd = torch.float64 if q.dtype == torch.float64 else torch.float32
    cpu = q.device.type == "cpu"
    want_lse = _want_lse(plan)
    compiled = not (cpu and (want_lse or q.dtype == torch.float64))
    grads = _grad_needed(q, k, v, plan)
    if cpu and grads:
        raise AttnLangError("backend 'flex' cannot run this call: FlexAttention has no backward pass on the CPU "
                            "(k or v requires grad); use backend='eager' for gradients on the CPU")
    if cpu and "score" in names_used(plan.score) and eager.may_overflow(q, k, plan.scale, fd):
        # scale * q·k can leave the compute dtype's range: an overflow to -inf would mask a key silently, which
        # the eager reference tells from a -inf the expression writes (it raises); on the GPU that value read
        # would stall every call before its kernel, so only the CPU checks
        return eager.attention(q, k, v, plan)
    if not cpu and v.shape[-1] < 16:
        raise AttnLangError(f"backend 'flex' cannot run this call: FlexAttention's GPU kernels need a value head dim "
                            f">= 16, got {v.shape[-1]}")
    kernel = kernel_for(q, plan, v.shape[-1], grads)
    if kernel == "FLASH" and not (plan.options and "BACKEND" in plan.options):
        # a second length for this variant and shape class (decoding): TRITON, whose graph serves every length,
        # rather than one FLASH compile per step
        first = _flash_lengths.setdefault(_flash_key(plan, q), (plan.q_len, plan.kv_len))
        if first != (plan.q_len, plan.kv_len):
            kernel = "TRITON"
    # the tensors score and mask read, in a fixed order: these become graph inputs
    names = tuple(sorted(_tensor_names(plan.score) | _tensor_names(plan.mask)))
    mask_names = tuple(sorted(_tensor_names(plan.mask)))
    score_names = _tensor_names(plan.score)
    # a tensor read only by the mask carries no gradient (the caller connects a zero one); flex refuses mask_mod
    # buffers that require grad (H200: "Captured buffers from mask mod that require grad are not supported")
    named = tuple(plan.tensors[n] if n in score_names else plan.tensors[n].detach() for n in names)
    if not grads:
        # torch's flex refuses CPU inputs that require grad even under no_grad; nothing needs their graph here
        q, k, v, named = q.detach(), k.detach(), v.detach(), tuple(t.detach() for t in named)
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    if compiled and cpu:
        # Inductor's CPU flex template takes no strided view as a captured buffer (LoweringException: "All the
        # buffers in the score and mask subgraph should be in kernel_group.args.input_buffers")
        named = tuple(t if t.is_contiguous() else t.contiguous() for t in named)
    bm = _block_mask(q, plan, mask_names, fd)

    def run(kern, tiles=None):
        kk, vv = k, v
        if kern == "FLASH" and grads and k.shape[1] != q.shape[1]:
            # FA4 4.0.0b36's backward gave NaN / wrong dq for grouped heads with a score_mod (H200: flex FLASH
            # test_bf16_grads[alibi], and the fa4 backend's test_gqa): k / v go in expanded to the query heads
            group = q.shape[1] // k.shape[1]
            kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        fn, any_length = _callable(q, kk, vv, plan, names, named, fd, kern, compiled, want_lse or not compiled, bm,
                                   tiles)
        lengths = None
        if any_length:
            lengths = _lengths_tensor(plan.q_len, plan.kv_len, q.device)
            _mark_lengths_dynamic((plan.q_len, plan.kv_len), q, kk, vv, _block_tensors(bm), named)
        with warnings.catch_warnings():
            # the unfused path warns that it is unfused, and return_lse is deprecated on newer torch
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            with contextlib.nullcontext() if compiled else torch._dynamo.config.patch(specialize_float=True):
                # uncompiled, flex_attention compiles one shared wrapper around the mods, whose closures hold the
                # expressions: a float literal that differs from the previous variant's (min(score, 2.0) after
                # min(score, 1.0)) would otherwise be traced as a symbolic float on the recompile, which the mods'
                # host-side checks (math.isfinite) cannot take ("torch.* op returned non-Tensor")
                res = fn(q, kk, vv, lengths, *_block_tensors(bm), *named)
            if grads and kern != "FLASH" and q.is_cuda and not torch.cuda.is_current_stream_capturing():
                _compile_backward_now(res[0], (q, kk, vv, *named), (_tiles_key(plan, q, grads), repr(tiles)))
            return res

    explicit = bool(plan.options) and "BACKEND" in plan.options
    try:
        out, lse, ran = _run_with_smaller_tiles(run, kernel, _tiles_key(plan, q, grads), plan.q_len)
    except AttnLangError:
        raise
    except Exception as e:  # compile failures surface as BackendCompilerFailed / InductorError / RuntimeError
        if kernel == "FLASH" and not explicit:
            _flash_failed[_flash_key(plan, q)] = str(e)[:500]
            _stats["flash_fallbacks"] += 1
            try:
                out, lse, ran = _run_with_smaller_tiles(run, "TRITON", _tiles_key(plan, q, grads), plan.q_len)
            except AttnLangError:
                raise
            except Exception as e2:
                raise _kernel_failure("TRITON", e2) from e2
        else:
            raise _kernel_failure(kernel, e) from e
    B, Hq, Sq = q.shape[0], q.shape[1], q.shape[2]
    if lse is None:
        # compiled CPU flex returns no lse; the plan said it needs none, so zeros keep the contract's shape
        lse = torch.zeros(B, Hq, Sq, dtype=fd, device=q.device)
        if bool(torch.isnan(out).any()):
            if not bool(torch.isfinite(v).all()):
                return _non_finite_v(q, k, v, plan)
            raise _bad_score(plan, "the score expression gives NaN or +inf at an allowed position; scores must be "
                                   "finite or -inf")
        return out, lse
    lse = lse.to(fd)  # float64 for float64 inputs until the denominator's corrections are done
    if ran == "FLASH":
        if _flash_lse_scaled_by_ln2():
            lse = lse / math.log(2.0)
        if grads:
            lse = _NoLseGrad.apply(lse, out)
    # a NaN or +inf score at an allowed position poisons its row's lse: an error, as on the eager reference
    # (one reduction and one host sync per call)
    bad = torch.isnan(lse) | (lse == math.inf)
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        # a CUDA graph being captured (a decode step) allows no host sync: the same check as a device-side assert,
        # which fails the replay (and the CUDA context) instead of raising AttnLangError
        torch._assert_async(~bad.any(), "attnlang flex: the score expression gives NaN or +inf at an allowed "
                                        "position; scores must be finite or -inf")
    else:
        # one host read for both: NaN / +inf in lse (a bad score) and NaN in a row of out with allowed keys (v not
        # finite; rows with none are zeroed below, whatever the kernel wrote there)
        nan_rows = torch.isnan(out).any(-1) & (lse != -math.inf)
        bad_score, nan_out = torch.stack((bad.any(), nan_rows.any())).tolist()
        if bad_score:
            b, h, i = (int(x) for x in bad.nonzero()[0])
            raise _bad_score(plan, f"the score expression gives NaN or +inf at an allowed position in row b={b}, "
                                   f"h={h}, q_idx={i}; scores must be finite or -inf",
                             _raw_row_problem(q, k, plan, b, h, i))
        if nan_out and not bool(torch.isfinite(v).all()):
            return _non_finite_v(q, k, v, plan)
    # rows with no allowed key: out 0 and lse -inf whatever the kernel wrote into out there
    empty = lse == -math.inf
    lse = torch.where(empty, torch.full_like(lse, -math.inf), lse)
    out = torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=out.dtype, device=out.device), out)
    out, lse = finish(out, lse, plan, fd, out_dtype=q.dtype)  # the sink and normalize=False, through lse
    if plan.lse_shift is not None:
        shift = row_values(plan.lse_shift, B, Hq, Sq, plan.kv_len, plan.tensors, fd, q.device)
        lse = lse + shift.to(lse.dtype)
    return out.to(q.dtype), lse_float32(lse)  # float64 stays float64 (API.md)


def _non_finite_v(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan):
    """(out, lse) of a call whose v holds NaN / inf, from the eager reference.

    LANGUAGE.md sums over the allowed keys, so a masked key's row of v (a KV cache's unwritten tail, say) must
    not reach out; FlexAttention multiplies whole tiles of weights by v, and 0 * NaN spread NaN into rows that
    never attend that key. The eager backend takes the product with those entries 0 and gives NaN / inf only to
    the rows whose keys of nonzero weight meet them (a rare, slower path: the common call pays one extra
    reduction over out, read with the lse check)."""
    _stats["non_finite_v"] += 1
    return eager.attention(q, k, v, plan)


_LENGTHS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _in_graph_pool(device) -> bool:
    """New allocations on this device go to a CUDA graph's private pool, which the graph's replays overwrite: a
    capture, or a warm-up run of torch.compile's CUDA graph trees (mode="reduce-overhead", on the trees' own
    stream). Caches keep no tensor made then; one kept from before (an eager call, or a warm-up on a user's side
    stream, as torch.cuda.graph's recipe does) is only read."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if torch.cuda.is_current_stream_capturing():
        return True
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:
        return False
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        manager = trees.get_manager(index, create_if_none_exists=False)
        return bool(manager is not None and manager.in_warmup
                    and torch.cuda.current_stream(device) == manager.stream)
    except Exception:  # another torch's internals: assume no pool (the cudagraph trees check would then say so)
        return False


def _lengths_tensor(q_len: int, kv_len: int, device) -> torch.Tensor:
    """[q_len, kv_len] as an int64 device tensor (graphs for every length never run on FLASH, so their ints are
    int64), kept for reuse (decoding asks for each kv_len once); built with fill kernels: no host-device sync."""
    key = (q_len, kv_len, str(device))
    t = _LENGTHS.get(key)
    if t is None:
        t = torch.full((2,), q_len, dtype=torch.int64, device=device)
        t[1:].fill_(kv_len)
        if not _in_graph_pool(device):
            _LENGTHS[key] = t
        while len(_LENGTHS) > 64:
            _LENGTHS.popitem(last=False)
    return t


def _raw_row_problem(q, k, plan: CallPlan, b: int, h: int, i: int) -> str:
    """raw_score_hint for row (b, h, i) when scale * q·k is NaN or +inf / -inf somewhere in it (this error's path
    only: one row's dot products), else ""."""
    group = q.shape[1] // k.shape[1]
    fd = torch.float64 if q.dtype == torch.float64 else torch.float32
    raw = (k[b, h // group].to(fd) @ q[b, h, i].to(fd)) * plan.scale
    off = ~torch.isfinite(raw)
    if not bool(off.any()):
        return ""
    j = int(off.nonzero()[0])
    return raw_score_hint(float(raw[j]), fd) + f" (at kv_idx={j})"


def _bad_score(plan: CallPlan, message: str, raw_problem: str = "") -> AttnLangError:
    """The error for a NaN / +inf score, with the caret under the score expression (as the eager reference)."""
    checked = plan.checked
    message += raw_problem or bad_score_hint(plan.score)  # NaN or +inf: flex's lse does not tell which
    return AttnLangError.at(message, checked.sources["score"], checked.score.span, where="score")


class _NoLseGrad(torch.autograd.Function):
    """lse from the FLASH kernel, whose backward has no lse term: passes lse through, and raises in the backward
    if a gradient reaches it (a loss using lse must run on TRITON), instead of silently dropping that term."""

    @staticmethod
    def forward(ctx, lse, anchor):
        ctx.set_materialize_grads(False)
        return lse.clone()

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and bool((grad != 0).any()):
            raise AttnLangError("backend 'flex' with kernel FLASH cannot differentiate lse (FlashAttention-4's "
                                "backward has no lse term); use kernel_options={'BACKEND': 'TRITON'} when the loss "
                                "uses lse")
        return None, None


def _tensor_names(expr: Expr) -> set[str]:
    return {n.tensor for n in walk(expr) if isinstance(n, Index)}


def cache_info() -> dict:
    """Counters: callables created (compiled), graphs Dynamo compiled (graphs: equal to compiled unless something
    recompiled), block masks built, FLASH fallbacks; sizes of the caches."""
    return dict(_stats, compiled_cached=len(_compiled), block_masks_cached=len(_block_masks))


def clear_caches() -> None:
    """Forget every compiled callable, block mask and FLASH fallback (tests; after changing torch settings)."""
    _compiled.clear()
    _block_masks.clear()
    _flash_failed.clear()
    _first_lengths.clear()
    _flash_lengths.clear()
    _LENGTHS.clear()
    _tile_level.clear()
    _backward_compiled.clear()
