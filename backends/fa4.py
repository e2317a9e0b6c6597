"""The FlashAttention-4 backend: the variant's expressions emitted as CuTeDSL modifiers for flash_attn.cute.

One entry point, ``attention(q, k, v, plan)``. Per call:
1. lowering (cached per variant, tensor dtypes and lengths): masks that ``attnlang.patterns.recognize`` maps onto
   the kernel's own causal / sliding-window flags use them (FA4 aligns windows bottom-right; a top-left window is
   shifted by kv_len - q_len, and used only when the shifted sizes stay >= 0); any other mask becomes a
   ``mask_mod``; a score other than ``score`` becomes a ``score_mod`` and its symbolic derivative
   (``attnlang.diff``) the ``score_mod_bwd``;
2. the modifiers are emitted by ``attnlang.emit_cute`` into a real module under the cache directory
   (``$ATTNLANG_CACHE_DIR`` or ``~/.cache/attnlang``, subfolder ``fa4``) and imported, so tracebacks show the
   generated code; each function carries ``__cute_hash__`` = its source hash, so FA4's compile caches never mix
   two variants, and FA4's on-disk kernel cache (enabled here unless the environment says otherwise) lets a second
   process skip compilation;
3. with a mask_mod, block sparsity from ``attnlang.sparsity`` (128x128 tiles, the Hopper forward tile) is
   passed for the forward (kv direction) and backward (q direction), so empty tiles are skipped and full ones need
   no mask_mod call; cached per lengths and mask tensors;
4. q/k/v [B, H, S, D] go in as transposed views [B, S, H, D] (no copy: FA4 accepts any 16-byte-aligned strides);
   GQA uses the kernel's own head grouping; lse is FA4's natural-log lse plus ``plan.lse_shift``.

Options (``kernel_options=`` of a call; any other key is an AttnLangError): ``fastmath`` (default True: MUFU tanh /
ex2 in the modifiers), ``bake`` (default True: small b/h-indexed tensors become constants), ``dense`` (default False:
True skips block sparsity), ``keep_mask_mod`` (default False: True keeps the mask_mod even when every tile is full
or empty; the environment variable ATTNLANG_FA4_KEEP_MASK_MOD=1 does the same for every call), ``window_flags``
(default True: recognised causal / window masks use the kernel's own flags; False runs them as a mask_mod with
tile lists), ``dense_tile_list`` (default False: True gives a mask-free call on tile-aligned lengths an all-full
tile list, FA4's block-sparse schedule), ``bhsd_out`` (default False: True has an inference call write out into
a [B, H, S, Dv] buffer, as flex's FA4 path does, instead of FA4's own [B, S, H, Dv]), ``varlen`` (default: by
direction, see ``attnlang.backends.fa4_varlen``; True runs packed documents ``doc[q_idx] == doc[kv_idx] & ...``
forward and backward on FA4's varlen kernels, False on tile lists), ``native_sink`` (default True: a sink of one
value per query head, finite, goes into the kernel as FA4's ``learnable_sink``; False, and any other sink, is
applied to FA4's (out, lse) by ``attnlang.denominator.finish``), ``guards`` (default True: the GUARDS
table's fixes for configurations the kernel's backward gets wrong: zero-padding head dims that are not
multiples of 32, expanding grouped k / v; False runs the kernel as is, for benchmarks/gpu_matrix.py's
evidence), ``replay`` (default True: a warm call of a signature seen before runs FA4's recorded allocations and
kernel launches without FA4's Python between them, once checked against FA4's own call; see
``attnlang.backends.fa4_replay``; False always calls FA4's host functions), ``short_q_tile`` (default True: an
inference call with at most 64 query rows per kv head, q_len x Hq / Hkv under FA4's pack_gqa, as in decoding,
runs FA4's Hopper forward with 64 x 128 tiles instead of its 128- or 192-row ones, whose rows past the real ones are
padding the score_mod is computed on all the same; see ``_short_q_tile``). FA4's split-KV (``num_splits`` > 1)
is not used: FA4 4.0.0b36 asserts "SplitKV not supported on SM 9.0" on Hopper (H200, session 5).

Gradients flow to q, k and v through FA4's backward. Gradients to floating tensors bound by name that the score or
mask read are not computed by the kernel: ``unsupported`` declines such calls (grad enabled and such a tensor
requiring grad), so "auto" runs them on flex, which computes them exactly. Tensors only the sink reads get their
gradients from FA4's learnable_sink backward (dsink, then autograd through the sink expression) or through FA4's
differentiable lse.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from ..ast import Binary, Call, Const, DType, Expr, Index, Op, Var, names_used, walk
from ..denominator import finish, head_values, per_head, sink_finite
from ..intervals import bounds, tensor_range
from ..lower_torch import row_values
from ..memo import MEMO, IdentityMemo
from ..plan import CallPlan, direct_backward_requested, give_direct_backward
from ..sparsity import mask_block_sparsity
from .fa4_replay import replayed
from .fa4_varlen import Host
from .fa4_varlen import route as route_varlen

__all__ = ["unsupported", "attention", "kernel_arguments", "cache_dir", "lowering", "Lowering", "OPTIONS",
           "native_sink", "GUARDS", "Guard", "KNOWN_GOOD", "guards_for"]

_TILE = (128, 128)          # Hopper forward tile for head dims up to 128: block-sparsity granularity
_SPARSE_MAX_HEAD_DIM = 128  # larger head dims use other tile widths; they run with the mask_mod alone
_SHORT_Q_TILE = (64, 128)   # Hopper forward tile for calls of at most 64 query rows per kv head (decoding)
_PIN_MAX_BYTES = 2 << 20    # named tensors a plan's memo (kernel arguments, replays) may hold: see _pinnable
_TABLE_MAX = 64             # tensors of at most this many elements, read at b/h-only indices, are baked in
_TABLE_VERSIONS = 8         # distinct baked value sets per variant before falling back to aux_tensors loads
_LOCK = threading.Lock()


_BAKED: dict = {}  # variant canonical -> set of baked value sets seen

OPTIONS = {"fastmath": True, "bake": True, "dense": False, "keep_mask_mod": False, "window_flags": True,
           "dense_tile_list": False, "bhsd_out": False, "varlen": None, "native_sink": True,
           "guards": True, "replay": True, "short_q_tile": True}


# ----- guards: configurations the kernel gets wrong, as data -----

@dataclass(frozen=True, slots=True)
class Guard:
    """One configuration of FA4 4.0.0b36's SM90 backward found wrong, and what this backend does instead.

    head_dims: "not_multiple_of_32" (q / k or v head dim) or "any". gqa / modifier: True or False to match only
    calls with (without) grouped heads / an emitted score_mod or mask_mod; None matches both. Every guard is for
    calls that need the backward (gradients to q, k or v); forward-only calls run the kernel as is.
    fix: "pad32" zero-pads q / k / v to the next multiple of 32 (scale from the true head dim, out sliced back,
    gradients sliced by autograd); "expand" repeats k / v to the query heads (autograd sums dk / dv over each group).
    wrong / evidence: what is wrong, and where it was measured (benchmarks/results/gpu_matrix.json: the cells with
    kernel_options={"guards": False} show the kernel itself).
    """

    head_dims: str
    gqa: bool | None
    modifier: bool | None
    fix: str
    wrong: str
    evidence: str

    def matches(self, head_dim: int, head_dim_v: int, gqa: bool, modifier: bool) -> bool:
        if self.head_dims == "not_multiple_of_32" and head_dim % 32 == 0 and head_dim_v % 32 == 0:
            return False
        return (self.gqa is None or self.gqa == gqa) and (self.modifier is None or self.modifier == modifier)


GUARDS = (
    Guard("not_multiple_of_32", None, None, "pad32",
          "dq (relative error 0.4-0.8 against float64 at head dims 8, 16, 48, 80; forward and 32, 64, 96, 128, "
          "192, 256 right)",
          "issue 12 (H200, flash-attn-4 4.0.0b36); upstream flash-attention PR #2896: the kernel rounds head dims "
          "to multiples of 16, its dq accumulator is allocated for multiples of 32; gpu_matrix.json"),
    Guard("not_multiple_of_32", True, None, "expand",
          "dk / dv with grouped heads and no modifier at those head dims (the grouped dK / dV accumulators are "
          "rounded like dq's)",
          "issue 12; gpu_matrix.json. Expanded as well as padded: the ungrouped padded kernel is the one the "
          "matrix verifies at every head dim"),
    Guard("any", True, True, "expand",
          "dq with grouped heads and an aux-reading score_mod (relative error 0.81; forward right)",
          "tests/test_fa4_gpu.py test_gqa[alibi], benchmarks/results/NOTES.md 02:55; flex FLASH test_bf16_grads"),
)

# (head_dim, head_dim_v, gqa) backward configurations that gpu_matrix.py found right without a guard that GUARDS would
# otherwise apply: none so far (the matrix's "guards": False cells are the evidence to add one).
KNOWN_GOOD: frozenset = frozenset()


def guards_for(head_dim: int, head_dim_v: int, gqa: bool, modifier: bool, grads: bool) -> tuple[Guard, ...]:
    """The GUARDS rows that apply to one call (none without gradients, none for a KNOWN_GOOD configuration)."""
    if not grads or (head_dim, head_dim_v, gqa) in KNOWN_GOOD:
        return ()
    return tuple(g for g in GUARDS if g.matches(head_dim, head_dim_v, gqa, modifier))


def _round32(d: int) -> int:
    return -(-d // 32) * 32


def _option(plan: CallPlan, name: str) -> bool:
    return bool(plan.options.get(name, OPTIONS[name]))


def _check_options(options) -> str | None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        return (f"unknown kernel_options for backend 'fa4': {', '.join(map(repr, unknown))}; expected some of "
                f"{', '.join(OPTIONS)}")
    bad = sorted(k for k, val in options.items() if not isinstance(val, bool))
    if bad:
        got = ", ".join(f"{k}={options[k]!r}" for k in bad)
        return f"kernel_options for backend 'fa4' take True or False; got {got}"
    return None


def cache_dir() -> Path:
    """Where generated modules (``fa4/<key>.py``) and compiled kernels (``fa4/kernels``) are kept."""
    root = os.environ.get("ATTNLANG_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "attnlang"
    return base / "fa4"


@functools.lru_cache(maxsize=1)
def _flash():
    """flash_attn.cute's interface, imported on first use with its persistent kernel cache switched on."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(cache_dir() / "kernels"))
    from flash_attn.cute import interface
    return interface


# ----- lowering: which kernel flags, which generated modifiers -----

@dataclass(frozen=True, slots=True)
class Lowering:
    """What the kernel is asked to do for one (variant, tensor dtypes, lengths).

    window: FA4's (window_size_left, window_size_right), bottom-right aligned; (None, None) for none.
    module: the generated CuteModule (None when neither a score_mod nor a mask_mod is needed).
    score_mod, mask_mod: whether the module defines them. tensors: names passed as aux_tensors, in order.
    mask_tensors / score_tensors: the aux tensors each expression reads (block sparsity needs the mask's).
    native: a human-readable summary (for explain() and the benchmark's notes).
    """

    window: tuple
    module: object
    score_mod: bool
    mask_mod: bool
    tensors: tuple
    mask_tensors: tuple
    score_tensors: tuple
    native: str


def _native_window(score: Expr, mask: Expr, q_len: int, kv_len: int):
    """FA4's (left, right) window when the whole mask is a causal / window pattern, else None."""
    try:
        from ..patterns import recognize
    except ImportError:
        return None
    try:
        nl = recognize(score, mask)
    except Exception:  # the recogniser is an optimisation: anything it cannot read stays a mask_mod
        return None
    if nl is None or getattr(nl, "residual_mask", None) is not None:
        return None
    left, right = nl.window_left, nl.window_right
    causal = nl.causal
    alignment = causal or getattr(nl, "alignment", None) or "top_left"
    if causal is not None:
        right = 0 if right is None else min(right, 0)
    if left is None and right is None:
        return (None, None)
    offset = (kv_len - q_len) if alignment == "bottom_right" else 0
    fa_offset = kv_len - q_len  # FA4: allowed iff q + fa_offset - left <= kv <= q + fa_offset + right
    fa_left = None if left is None else left - offset + fa_offset
    fa_right = None if right is None else right + offset - fa_offset
    if (fa_left is not None and fa_left < 0) or (fa_right is not None and fa_right < 0):
        return None
    return (fa_left, fa_right)


@functools.lru_cache(maxsize=256)
def _lowering_cached(score: Expr, mask: Expr, dtypes: tuple, q_len: int, kv_len: int, fastmath: bool,
                     tables: tuple = (), window_flags: bool = True):
    from ..diff import derivative
    from ..emit_cute import emit_module
    from ..printer import to_source
    identity = isinstance(score, Var) and score.name == "score"
    no_mask = isinstance(mask, Const) and mask.value is True
    window = (None, None)
    mask_expr = None if no_mask else mask
    native = "no mask" if no_mask else "mask_mod"
    if not no_mask and window_flags:
        w = _native_window(score, mask, q_len, kv_len)
        if w is not None:
            window, mask_expr = w, None
            native = f"kernel window flags {w}"
    score_expr = None if identity else score
    dscore = None if identity else derivative(score)
    used = set()
    for e in (score_expr, mask_expr):
        if e is not None:
            used |= {n.tensor for n in walk(e) if isinstance(n, Index)}
    tables = {name: (shape, values) for name, shape, values in tables}
    tensors = tuple(sorted(used - set(tables)))
    mask_tensors = tuple(sorted({n.tensor for n in walk(mask_expr) if isinstance(n, Index)})) if mask_expr else ()
    module = None
    if score_expr is not None or mask_expr is not None:
        header = f"score: {to_source(score)} | mask: {to_source(mask)}"
        module = emit_module(score_expr, mask_expr, dscore, tensors, fastmath=fastmath, header=header,
                             tables=tables)
    score_tensors = tuple(sorted({n.tensor for n in walk(score_expr) if isinstance(n, Index)} - set(tables))) \
        if score_expr is not None else ()
    return Lowering(window, module, score_expr is not None, mask_expr is not None, tensors, mask_tensors,
                    score_tensors, native)


_READS = IdentityMemo()


def _bakeable_reads(score: Expr, mask: Expr) -> dict:
    """tensor name -> whether every read of it is indexed by b, h and constants only (cached per AST object)."""
    def compute():
        reads: dict = {}
        for expr in (score, mask):
            for node in walk(expr):
                if isinstance(node, Index):
                    ok = all(names_used(i) <= {"b", "h"} for i in node.indices)
                    reads[node.tensor] = reads.get(node.tensor, True) and ok
        return reads
    return _READS.get((score, mask), None, compute)


def _tables(plan: CallPlan) -> tuple:
    """Small tensors read only at indices built from b, h and constants (``slope[h]``, ``gate[b, h]``): their
    values are baked into the generated module as constants, so the kernel never loads them (and needs no
    aux_tensors, which also lets it keep its wider score vectors). One device sync per tensor version."""
    if not _option(plan, "bake") or not plan.tensors:
        return ()
    reads = _bakeable_reads(plan.score, plan.mask)
    seen = _BAKED.setdefault(plan.key, set())
    out = []
    for name, ok in sorted(reads.items()):
        t = plan.tensors[name]
        if not ok or t.numel() > _TABLE_MAX or t.is_complex() or (torch.is_grad_enabled() and t.requires_grad):
            continue
        values = MEMO.get(t, "values", lambda x: tuple(
            int(v) if isinstance(v, bool) else v for v in x.detach().flatten().tolist()))
        if not t.is_floating_point() and any(not -(1 << 31) <= v < (1 << 31) for v in values):
            continue
        entry = (name, tuple(t.shape), values)
        if entry not in seen and len(seen) >= _TABLE_VERSIONS:
            continue  # values that change from call to call: load them instead of recompiling each time
        seen.add(entry)
        out.append(entry)
    return tuple(out)


_LOWERED = IdentityMemo()


_LAST_LOWERING = (lambda: None, None)  # (weakref to a plan, its lowering): unsupported() and attention() ask for
# the same plan; one tuple, replaced whole, so a thread never pairs one plan with another's lowering


def lowering(plan: CallPlan) -> Lowering:
    """The (cached) lowering of one call. Raises emit_cute.Unsupported for what the kernel cannot compute."""
    global _LAST_LOWERING
    ref, low = _LAST_LOWERING
    if ref() is plan:
        return low
    low = _lowering_of(plan)
    _LAST_LOWERING = (weakref.ref(plan), low)
    return low


def _lowering_of(plan: CallPlan) -> Lowering:
    dtypes = tuple(sorted((n, str(t.dtype)) for n, t in plan.tensors.items()))
    fastmath, window_flags = _option(plan, "fastmath"), _option(plan, "window_flags")
    tables = _tables(plan)
    # identity-keyed in front of _lowering_cached's lru_cache, which hashes the ASTs
    extra = (dtypes, plan.q_len, plan.kv_len, fastmath, tables, window_flags)
    return _LOWERED.get((plan.score, plan.mask), extra, lambda: _lowering_cached(
        plan.score, plan.mask, dtypes, plan.q_len, plan.kv_len, fastmath, tables, window_flags))


# ----- generated modules -----

_MODULES: dict = {}


def _load(module):
    """Write the generated source to ``cache_dir()/<key>.py`` (once) and import it."""
    got = _MODULES.get(module.key)
    if got is not None:
        return got
    with _LOCK:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{module.key}.py"
        if not path.exists() or path.read_text() != module.source:
            tmp = folder / f".{module.key}.{os.getpid()}.tmp"
            tmp.write_text(module.source)
            os.replace(tmp, path)
        name = f"attnlang_fa4_{module.key}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _MODULES[module.key] = mod
    return mod


# ----- block sparsity -----

_SPARSITY: OrderedDict = OrderedDict()
_SPARSITY_SIZE = 16


def _block_sparse(plan: CallPlan, low: Lowering, device):
    """(forward, backward, has_partial): BlockSparseTensorsTorch for the mask_mod's kernel in each direction, and
    whether any tile is partial (needs the mask_mod at all)."""
    uses = names_used(plan.mask)
    key = (plan.key, plan.q_len, plan.kv_len,
           plan.batch if "b" in uses else 1, plan.q_heads if "h" in uses else 1,
           tuple((n, MEMO.token(plan.tensors[n])) for n in low.mask_tensors))
    got = _SPARSITY.get(key)
    if got is not None:
        _SPARSITY.move_to_end(key)
        return got
    # the tensors go in as a mapping: a tensor may be named like an argument (batch, device, ...)
    bs = mask_block_sparsity(plan.mask, plan.checked.tensors, plan.checked.sources, plan.q_len, plan.kv_len,
                             key[3], key[4], _TILE, {n: plan.tensors[n] for n in low.mask_tensors})
    fwd, bwd = bs.to_fa4(device=device), bs.to_fa4(device=device, transpose=True)
    _SPARSITY[key] = (fwd, bwd, bool((bs.kind == 1).any()))
    while len(_SPARSITY) > _SPARSITY_SIZE:
        _SPARSITY.popitem(last=False)
    return _SPARSITY[key]


# ----- the backend contract -----

def _aux(t: torch.Tensor) -> torch.Tensor:
    """A named tensor as the kernel reads it: int32 / float32 / 16-bit floats, contiguous."""
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.dtype == torch.float64:
        t = t.to(torch.float32)
    elif not t.is_floating_point() and t.dtype != torch.int32:
        t = t.to(torch.int32)
    return t.contiguous()


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def _sm_major(t: torch.Tensor) -> int:
    """The compute capability's major number of ``t``'s CUDA device (9: Hopper), 0 off CUDA."""
    if not t.is_cuda:
        return 0
    return _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())[0]


def _device_problem(q: torch.Tensor) -> str | None:
    """Why q's device cannot run FA4 (None if it can); the capability is asked once per device."""
    if not q.is_cuda or not torch.cuda.is_available():
        return "FA4 needs a CUDA GPU (q is on the CPU or CUDA is unavailable)"
    major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if major < 9:
        return f"FA4 needs a Hopper (sm90) or newer GPU; this one is sm{major}{minor}"
    return None


def backward_nan_risk(plan: CallPlan) -> str | None:
    """Why FA4's ``score_mod_bwd`` could give NaN gradients for this call, or None.

    FA4's backward multiplies dS by d score'/d score at every position of a tile, also where the weight is 0 (a
    masked pair, or a score of -inf such as ``log(max(score, 0.0))`` where the score is <= 0): there dS is 0,
    and 0 * inf is NaN. The derivative can be infinite where it divides by something that can be 0 (the
    derivatives of ``log``, ``sqrt`` and ``/``), takes a log of something that can be <= 0, or raises something that
    can be 0 to a power that is not a non-negative int (intervals over this call's value ranges decide)."""
    score = plan.score
    if isinstance(score, Var) and score.name == "score":
        return None
    # per bound score and value ranges: the derivative and its intervals cost ~25 us, on every training call
    return _NAN_RISKS.get((score,), tuple(plan.value_ranges.items()), lambda: _nan_risk(score, plan.value_ranges))


_NAN_RISKS = IdentityMemo()


def _nan_risk(score: Expr, env) -> str | None:
    from ..diff import derivative
    from ..printer import to_source

    def can_be_zero(x):  # exp / sigmoid are 0 only by float32 underflow (scores below about -88): left to FA4
        return not (isinstance(x, Call) and x.func in ("exp", "exp2", "sigmoid")) and bounds(x, env).contains(0.0)
    for n in walk(derivative(score)):
        if isinstance(n, Binary) and n.op is Op.TRUEDIV and can_be_zero(n.right):
            return f"it divides by {to_source(n.right)}, which can be 0"
        if isinstance(n, Call) and n.func in ("log", "log2") and bounds(n.args[0], env).lo <= 0:
            return f"it takes {n.func}({to_source(n.args[0])}), which can be <= 0"
        if isinstance(n, Binary) and n.op is Op.POW and can_be_zero(n.left) and not (
                isinstance(n.right, Const) and n.right.dtype is not DType.BOOL and float(n.right.value) >= 1.0
                and float(n.right.value).is_integer()):
            return f"it raises {to_source(n.left)}, which can be 0, to the power {to_source(n.right)}"
    return None


def _backward_nan_message(why: str) -> str:
    return (f"gradients through this score are not computed by the FA4 kernel: its score_mod_bwd runs where a weight "
            f"is 0 too (masked pairs, -inf scores), and the score's derivative can be infinite there ({why}): "
            f"0 * inf would be NaN; flex computes them")


def unsupported(q: torch.Tensor, plan: CallPlan) -> str | None:
    """None when FA4 can run this call, else why not (so "auto" falls back to flex)."""
    bad = _check_options(plan.options)
    if bad:
        return bad
    bad = _device_problem(q)
    if bad:
        return bad
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 computes in float16 / bfloat16; q is {q.dtype}"
    D = q.shape[-1]
    if not (8 <= D <= 256 and D % 8 == 0):
        return f"FA4 takes head dims that are multiples of 8 in [8, 256]; got {D}"
    try:
        _flash()
    except Exception as e:  # ImportError, or a broken CUDA / CUTLASS install
        return f"flash_attn.cute (flash-attn-4) is not importable: {e}"
    if torch.is_grad_enabled():
        kernel_reads = names_used(plan.score) | names_used(plan.mask)  # the sink's tensors: autograd outside
        needing = sorted(n for n, t in plan.tensors.items() if t.requires_grad and n in kernel_reads)
        if needing:
            return (f"gradients to named tensors ({', '.join(needing)}) are not computed by the FA4 kernel; "
                    f"flex computes them")
        if q.requires_grad:  # k / v alone needing gradients: attention() checks the same and raises
            why = backward_nan_risk(plan)
            if why is not None:
                return _backward_nan_message(why)
    from ..emit_cute import Unsupported
    try:
        low = lowering(plan)
    except Unsupported as e:
        return f"the expression cannot be emitted as CuTeDSL: {e}"
    for name in low.tensors:
        t = plan.tensors[name]
        if t.is_complex():
            return f"tensor {name!r} has a complex dtype"
        if not t.is_floating_point() and t.dtype != torch.bool and t.numel():
            # the call checks' range (read once per tensor version, or declared with kernel_options value_ranges)
            r = plan.value_ranges.get(name) or MEMO.get(t, "range", tensor_range)
            lo, hi = int(r.lo), int(r.hi)
            if lo < -(1 << 31) or hi >= (1 << 31):
                return f"tensor {name!r} holds values outside int32 ({lo}..{hi}); the kernel computes in int32"
    return None


def kernel_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, fixes=None):
    """(k, v, kwargs) for ``flash_attn_func(q, k, v, **kwargs)`` on [B, S, H, D] views: the lowering's modifiers,
    aux_tensors, window flags and tile lists for this call (k / v expanded to the query heads where a GUARDS row
    says so; ``fixes``: the guards' fixes when the caller has computed them, before padding). Raises KernelFailure
    (an AttnLangError) for a value head dim FA4 does not take."""
    Dv = v.shape[-1]
    if not (8 <= Dv <= 256 and Dv % 8 == 0):
        from . import KernelFailure  # a KernelFailure: "auto" moves on to flex
        raise KernelFailure(f"FA4 takes value head dims that are multiples of 8 in [8, 256]; got {Dv}")
    low = lowering(plan)
    mod = _load(low.module) if low.module is not None else None
    score_mod = getattr(mod, "score_mod", None) if low.score_mod else None
    score_mod_bwd = getattr(mod, "score_mod_bwd", None) if low.score_mod else None
    mask_mod = getattr(mod, "mask_mod", None) if low.mask_mod else None
    # while a CUDA graph is captured the conversion is captured too (a cached copy would freeze the values a
    # replay reads: a tensor written in place between replays, e.g. a cache length, keeps its version then)
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    aux = [_aux(plan.tensors[n]) if capturing else MEMO.get(plan.tensors[n], "aux", _aux) for n in low.tensors] or None
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if fixes is None:
        fixes = {g.fix for g in _guards(q, k, v, plan, low, grads)}
    if "expand" in fixes:
        # k / v expanded to the query heads (h_kv = h // group, as repeat_interleave lays them out); autograd sums
        # dk / dv back over the group
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    sparse_fwd = sparse_bwd = None
    tiles_fit = max(q.shape[-1], Dv) <= _SPARSE_MAX_HEAD_DIM and not _option(plan, "dense")
    aligned = plan.q_len % _TILE[0] == 0 and plan.kv_len % _TILE[1] == 0
    if mask_mod is not None and tiles_fit:
        sparse_fwd, sparse_bwd, partial = _block_sparse(plan, low, q.device)
        if (not partial and aligned and not _option(plan, "keep_mask_mod")
                and os.environ.get("ATTNLANG_FA4_KEEP_MASK_MOD") != "1"):
            # every tile is empty or full (documents on tile boundaries): the tile lists say everything, so the
            # kernel is built without the mask_mod and without the tensors only the mask reads
            mask_mod = None
            if not low.score_tensors:
                aux = None
    elif (not low.mask_mod and low.window == (None, None) and tiles_fit and aligned
          and _option(plan, "dense_tile_list")):
        # no mask at all: every tile full; FA4 then runs its block-sparse schedule instead of the dense one
        sparse_fwd, sparse_bwd, _ = _block_sparse(plan, low, q.device)
    kwargs = dict(softmax_scale=plan.scale, causal=False, window_size=low.window, score_mod=score_mod,
                  score_mod_bwd=score_mod_bwd, mask_mod=mask_mod, aux_tensors=aux, block_sparse_tensors=sparse_fwd,
                  block_sparse_tensors_bwd=sparse_bwd, return_lse=_wants_lse(plan))
    if native_sink(plan):
        # [Hq] float32 natural-log logits: FA4 folds them into its softmax statistics and its backward returns
        # their gradient (dsink), which autograd carries on to the tensors the sink reads
        kwargs["learnable_sink"] = head_values(plan, q.device, torch.float32)
    return k, v, kwargs


# what the varlen path (fa4_varlen, which cannot import this module) uses of it; looked up at call time
VARLEN_HOST = Host(flash=lambda: _flash(), load=lambda m: _load(m), aux=lambda t: _aux(t),
                   tables=lambda p: _tables(p), option=lambda p, n: _option(p, n),
                   native_window=lambda *a: _native_window(*a),
                   kernel_arguments=lambda q, k, v, p: kernel_arguments(q, k, v, p),
                   pinnable=lambda p: _pinnable(p))


def _wants_lse(plan: CallPlan) -> bool:
    """Whether this call needs FA4's lse (a backward gets it from FA4 anyway)."""
    return plan.return_lse or plan.sink is not None or not plan.normalize


def native_sink(plan: CallPlan) -> bool:
    """Whether the call's sink goes into the kernel as FA4's learnable_sink: one finite value per query head."""
    return (plan.sink is not None and _option(plan, "native_sink") and per_head(plan) and sink_finite(plan))


def _guards(q, k, v, plan: CallPlan, low: Lowering, grads: bool) -> tuple[Guard, ...]:
    if not _option(plan, "guards"):
        return ()
    return guards_for(q.shape[-1], v.shape[-1], k.shape[1] != q.shape[1], low.module is not None, grads)


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` with zeros appended to its last dim up to ``size`` (differentiable: the gradient is sliced back)."""
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]))


def _forward_arguments(kwargs: dict) -> tuple[dict, dict]:
    """flash_attn_func-style ``kwargs`` split into _flash_attn_fwd's keyword arguments and the backward's own
    (score_mod_bwd, block_sparse_tensors_bwd), with the values flash_attn_func's FlashAttnFunc passes (softcap 0.0).
    Kept with the plan (never modified: callers pass copies on)."""
    fwd = dict(kwargs)
    fwd["window_size_left"], fwd["window_size_right"] = fwd.pop("window_size")
    bwd = {"score_mod_bwd": fwd.pop("score_mod_bwd"), "block_sparse_tensors": fwd.pop("block_sparse_tensors_bwd")}
    fwd["softcap"] = 0.0
    return fwd, bwd


def _pinnable(plan: CallPlan) -> bool:
    """Whether this plan's memo may keep its kernel arguments and replays, which hold the aux tensors (often the
    caller's named tensors themselves) strongly: only while those come to at most _PIN_MAX_BYTES. A Variant keeps up
    to 64 recent plans (Variant._warm_plan), each holding its call's named tensors weakly so that a plan goes when its
    tensors do; kernel arguments in its memo would keep them alive instead: a per-call [H, S, S] bias made fresh in
    every inference step stayed on the device for the next 63 steps. Larger tensors run without the memo and the
    replay (one kernel-argument build and FA4's own host call per call, ~0.1 ms, beside a kernel that reads them)."""
    got = plan.memo.get("pinnable")
    if got is None:
        size = sum(t.numel() * t.element_size() for t in plan.tensors.values())
        got = plan.memo["pinnable"] = size <= _PIN_MAX_BYTES
    return got


def _short_q_tile(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, fwd: dict, plan: CallPlan) -> dict:
    """_flash_attn_fwd's ``fwd`` arguments with ``tile_mn`` = 64 x 128 where the call has at most 64 query rows per
    kv head (q_len x Hq / Hkv: FA4 packs grouped heads into the query tile on Hopper), on Hopper, with head dim <= 64
    or in 97..128 (where FA4's own tile has register-sourced P @ V too, so only the row count changes) and no tile
    lists. qt / kt / vt: [B, S, H, D] as FA4 gets them. FA4's 128- (192- at head dim <= 64) row tile is then mostly
    padding rows, whose score_mod is evaluated all the same. decode_tiles.md (benchmarks/results/s10, H200, B=16
    Hq=32 Hkv=8 kv_len 16384 D=128, checked against float64): rel_table 0.457 -> 0.302 ms at q_len 1 and 16,
    softcap 0.264 -> 0.249 (q_len 1) and 0.283 -> 0.250 (16), causal and alibi unchanged."""
    if not _option(plan, "short_q_tile") or fwd.get("block_sparse_tensors") is not None:
        return fwd
    D, Dv = qt.shape[-1], vt.shape[-1]
    rows = qt.shape[1] * max(1, qt.shape[2] // kt.shape[2])
    if rows > _SHORT_Q_TILE[0] or not (D <= 64 or 96 < D <= 128) or Dv > 128 or _sm_major(qt) != 9:
        return fwd
    return {**fwd, "tile_mn": _SHORT_Q_TILE}


def _replayed(plan: CallPlan, key: tuple | None, exact: bool, call, inputs: tuple, constants: tuple, fa):
    """``call()`` (an FA4 host call on ``inputs``), through the signature's Replay where ``key`` is given."""
    return replayed(plan.memo, key, exact, call, inputs, constants, (fa,))


def _constants(fwd: dict) -> tuple:
    """The plan's own tensors among FA4's arguments (kept by a recorded call as they are)."""
    return (fwd.get("aux_tensors"), fwd.get("block_sparse_tensors"), fwd.get("learnable_sink"))


def _training(fa, qt, kt, vt, fwd: dict, bwd: dict, plan: CallPlan | None = None, key: tuple | None = None):
    """FA4's forward with gradients as flash_attn_func's FlashAttnFunc runs it (the same kernels, the same arguments:
    softcap 0.0, deterministic False), each of its two host calls through the signature's Replay (``key``).

    ``qt`` / ``kt`` / ``vt``: [B, S, H, D] views. Returns (out [B, S, H, Dv], lse [B, H, S], backward), where
    ``backward(out, lse, dout [B, S, H, Dv], dlse [B, H, S] or None)`` gives (dq, dk, dv) in FA4's [B, S, H, D]
    layout. ``backward`` holds q / k / v but not out / lse: an autograd node keeping it (``_FlashTraining``) would
    otherwise hold its own output, a reference cycle through the C++ graph that Python's collector cannot free (a
    training step's out, lse and saved tensors leaked, every step: one cudaMalloc a step on the H200)."""
    qt, kt, vt = qt.detach(), kt.detach(), vt.detach()
    forward = dict(fwd, return_lse=True)  # the backward needs lse
    out, lse = _replayed(plan, None if key is None else key + ("fwd",), True,
                         lambda: fa._flash_attn_fwd(qt, kt, vt, **forward), (qt, kt, vt), _constants(fwd), fa)[:2]
    return out, lse, functools.partial(_training_backward, fa, qt, kt, vt, fwd, bwd, plan, key)


def _training_backward(fa, qt, kt, vt, fwd: dict, bwd: dict, plan, key, out, lse, dout, dlse):
    """``_training``'s backward: FA4's _flash_attn_bwd, through the signature's Replay."""
    def call():
        return fa._flash_attn_bwd(
            qt, kt, vt, out, dout, lse, fwd["softmax_scale"], False, 0.0,
            window_size_left=fwd["window_size_left"], window_size_right=fwd["window_size_right"],
            score_mod=fwd["score_mod"], score_mod_bwd=bwd["score_mod_bwd"], mask_mod=fwd["mask_mod"],
            aux_tensors=fwd["aux_tensors"], block_sparse_tensors=bwd["block_sparse_tensors"], dlse=dlse)
    # dq accumulates with fp32 atomics: two runs agree to a tolerance, not bit for bit
    return _replayed(plan, None if key is None else key + ("bwd",), False, call,
                     (qt, kt, vt, out, dout, lse, dlse),
                     _constants(fwd) + (bwd["block_sparse_tensors"],), fa)[:3]


def _direct_training(fa, qt, kt, vt, fwd: dict, bwd: dict, plan: CallPlan | None = None, key: tuple | None = None):
    """(out [B, S, H, Dv], lse [B, H, S]) of ``_training``, its backward handed to attnlang.op
    (``attnlang.plan.give_direct_backward``) rather than recorded as an autograd graph: the op's backward calls
    FA4's _flash_attn_bwd itself, without a reentrant autograd engine run; the gradients come back as
    [B, H, S, D] views of FA4's."""
    out, lse, backward = _training(fa, qt, kt, vt, fwd, bwd, plan, key)

    def handed_over(grad_out, grad_lse):  # FA4's out / lse are not the op's outputs: no cycle here
        dlse = None if grad_lse is None else grad_lse.contiguous()
        return tuple(g.transpose(1, 2) for g in backward(out, lse, grad_out.transpose(1, 2), dlse))

    give_direct_backward(handed_over)
    return out, lse


class _FlashTraining(torch.autograd.Function):
    """An eager training call's autograd node: ``_training``'s forward and backward (flash_attn_func's own node
    runs the same two FA4 host calls, but never through a Replay)."""

    @staticmethod
    def forward(ctx, qt, kt, vt, run, aux: tuple):
        out, lse, ctx.flash_backward = run(qt, kt, vt)
        # in-place changes of q / k / v, out or lse before the backward are errors, as with FlashAttnFunc (FA4's
        # backward reads out and lse); so are those of the aux tensors the backward's score_mod_bwd reads (often
        # the caller's named tensor itself): else its gradients were silently those of the new values
        ctx.save_for_backward(qt, kt, vt, out, lse, *aux)
        ctx.set_materialize_grads(False)
        ctx.out_meta = (out.shape, out.dtype, out.device)
        return out, lse

    @staticmethod
    @once_differentiable  # FA4's backward kernels have no derivative: create_graph=True is an error, not zeros
    def backward(ctx, grad_out, grad_lse):
        out, lse = ctx.saved_tensors[3:5]  # also the version check
        if grad_out is None:  # only lse was used
            shape, dtype, device = ctx.out_meta
            grad_out = torch.zeros(shape, dtype=dtype, device=device)
        dlse = None if grad_lse is None else grad_lse.contiguous()
        dq, dk, dv = ctx.flash_backward(out, lse, grad_out, dlse)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan):
    """Attention for one checked call on FlashAttention-4.

    Args:
        q: [B, Hq, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv]; float16 / bfloat16 on an sm90+ GPU.
        plan: the bound, simplified call (see attnlang.plan.CallPlan).
    Returns:
        out [B, Hq, Sq, Dv] in q's dtype (a transposed view of FA4's [B, Sq, Hq, Dv] output), lse float32
        [B, Hq, Sq] (natural log, -inf for rows with no allowed key, the sink there with a sink; plus
        plan.lse_shift); lse is None when neither the caller (plan.return_lse), a sink or normalize=False, nor a
        backward needs it: the kernel then skips it.
    v must be finite at the keys of every tile a row attends: FA4 multiplies whole tiles of weights by v, so a
    masked key's NaN / inf (an unwritten KV-cache tail) in a tile that also holds allowed keys reaches out as NaN
    (as with FA4 called directly); knowing it would take a host read per call. Zero a cache's unused tail, or use
    backend "flex" / "eager", which sum over the allowed keys only.
    Raises:
        AttnLangError: the sink is NaN or +inf; KernelFailure (an AttnLangError): a value head dim FA4
            does not take.
    """
    fa = _flash()
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if grads and not q.requires_grad:  # unsupported() saw q only; k / v need gradients
        why = backward_nan_risk(plan)
        if why is not None:
            from . import KernelFailure  # a KernelFailure: "auto" moves on to flex
            raise KernelFailure(_backward_nan_message(why))
    Dv = v.shape[-1]
    # what this plan gives for these shapes, kept with the plan (a warm call reuses it: Variant._warm_plan)
    shapes = ("fa4", grads, q.shape, k.shape, v.shape, q.device)  # torch.Size: a hashable tuple, no copy
    # the guards' fixes first, so that both paths below (varlen and the rest) run the fixed configuration
    fixes = plan.memo.get(shapes)
    if fixes is None:
        fixes = plan.memo[shapes] = frozenset(g.fix for g in _guards(q, k, v, plan, lowering(plan), grads))
    if "pad32" not in fixes:
        # packed documents first, on k / v as given: the varlen path expands them itself where ITS modifiers
        # meet grouped heads (fa4_varlen._expanded, the "expand" row of GUARDS); the tile-list lowering's
        # document mask_mod, which makes that row match here, is not part of the varlen kernels
        routed = route_varlen(q, k, v, plan, VARLEN_HOST)
        if routed is not None:
            return routed
    if "expand" in fixes:
        # k / v expanded to the query heads (h_kv = h // group, as repeat_interleave lays them out); autograd sums
        # dk / dv back over the group
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if "pad32" in fixes:
        # zeros add nothing to q·k and give zero columns of out; plan.scale is the true head dim's
        D = _round32(q.shape[-1])
        q, k, v = _pad_last(q, D), _pad_last(k, D), _pad_last(v, _round32(Dv))
    # packed documents on FA4's varlen kernels, where they apply (tried above unless padded)
    routed = route_varlen(q, k, v, plan, VARLEN_HOST) if "pad32" in fixes else None
    if routed is not None:
        out, lse = routed
        return (out[..., :Dv] if out.shape[-1] != Dv else out), lse
    # kernel arguments are the plan's alone, except while a CUDA graph is captured (aux conversions are captured
    # then) and when a named tensor needs gradients (the learnable sink is a node of this call's autograd graph)
    tensor_grads = torch.is_grad_enabled() and any(t.requires_grad for t in plan.tensors.values())
    reuse = (not fixes and not (q.is_cuda and torch.cuda.is_current_stream_capturing()) and not tensor_grads
             and _pinnable(plan))
    # flash_attn_func's kwargs, and their split for _flash_attn_fwd / _flash_attn_bwd
    arguments = plan.memo.get(shapes + ("kwargs",)) if reuse else None
    if arguments is None:
        k, v, kwargs = kernel_arguments(q, k, v, plan, fixes=())  # fixed above
        split = _forward_arguments(kwargs)
        # an inference call's _flash_attn_fwd arguments: FA4's short query tile where it applies (decoding)
        inference = _short_q_tile(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), split[0], plan)
        arguments = (kwargs, split, inference)
        if reuse:
            plan.memo[shapes + ("kwargs",)] = arguments
    kwargs, split, inference = arguments
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # a warm signature's calls replay FA4's recorded launches (fa4_replay), where the arguments are the plan's
    replay_key = shapes + ("replay",) if reuse and _option(plan, "replay") else None
    if not grads and not tensor_grads:
        # inference: _flash_attn_fwd itself, as flash_attn_func's autograd.Function calls it (~10-20 us less host)
        fwd = inference
        if _option(plan, "bhsd_out"):
            # out written straight into a [B, H, S, Dv] buffer (the layout of q), as flex's FA4 path does
            out = torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32, device=q.device) \
                if _wants_lse(plan) else None
            fa._flash_attn_fwd(qt, kt, vt, out=out.transpose(1, 2), lse=lse, **fwd)
        else:
            out, lse = _replayed(plan, replay_key, True, lambda: fa._flash_attn_fwd(qt, kt, vt, **fwd),
                                 (qt, kt, vt), _constants(fwd), fa)[:2]
            out = out.transpose(1, 2)
    elif grads and not fixes and plan.sink is None and plan.normalize and "learnable_sink" not in kwargs:
        if direct_backward_requested():  # inside attnlang's op: the op's backward calls FA4's backward itself
            out, lse = _direct_training(fa, qt, kt, vt, *split, plan=plan, key=replay_key)
        else:
            out, lse = _FlashTraining.apply(
                qt, kt, vt, lambda a, b, c: _training(fa, a, b, c, *split, plan=plan, key=replay_key),
                tuple(split[0].get("aux_tensors") or ()))
        out = out.transpose(1, 2)
    else:
        out, lse = fa.flash_attn_func(qt, kt, vt, **kwargs)
        out = out.transpose(1, 2)
    if out.shape[-1] != Dv:
        out = out[..., :Dv]
    if plan.sink is not None or not plan.normalize:
        out, lse = finish(out, lse, plan, torch.float32, sink_in_kernel="learnable_sink" in kwargs,
                          out_dtype=q.dtype)
        out = out.to(q.dtype)
    if plan.lse_shift is not None:
        shift = row_values(plan.lse_shift, plan.batch, plan.q_heads, plan.q_len, plan.kv_len, plan.tensors,
                           torch.float32, q.device)
        lse = lse + shift
    return out, lse
