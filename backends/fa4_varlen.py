"""FA4's varlen path for packed documents: ``doc[q_idx] == doc[kv_idx]`` (or ``doc[b, q_idx] == doc[b, kv_idx]``),
and-ed with anything, run as FlashAttention's variable-length sequences instead of a mask over the whole row.

Where the ids of ``doc`` form contiguous runs (sorted ids, or any order of whole runs), the pairs the equality
allows are exactly the pairs inside one run, so each run is one varlen sequence. Per call:
1. ``attnlang.patterns.documents`` finds the equality; the call must be self-attention (q_len == kv_len, so each
   document spans the same positions of q and kv), head dims multiples of 32, B * S < 2^31;
2. ``pack_documents`` derives ``cu_seqlens`` (int32 on the device: each run's first row in the [B * S] packed
   rows, batch row after batch row) and the longest run, cached per tensor object and version (a few device
   syncs once per version); ids in several runs (e.g. ``[0, 1, 0]``) give None and the call runs on tile lists;
3. the other conjuncts (``Documents.rest``) become FA4's causal / window flags where they are exact (inside one
   document of a self-attention call, ``q_idx >= kv_idx`` is FA4's ``causal=True``: q and kv share the
   document's offset), else a mask_mod; the score a score_mod; both emitted with ``positions=`` so they read the
   global ``b``, ``q_idx``, ``kv_idx``, ``q_len``, ``kv_len`` of LANGUAGE.md (``attnlang.emit_cute``);
4. q / k / v go in in one of two layouts (``_layout``), the one with fewer copies (ties: packed):
   - packed, [B * S, H, D]: a view for B == 1 or [B, S, H, D]-laid-out tensors, else one copy; out and lse come
     back as views ([total, H, Dv] -> [B, H, S, Dv]; lse [H, total] -> [B, H, S]);
   - batch folded into heads, [S, B * H, D] (``x.permute(2, 0, 1, 3)``, batch b head h as head b * H + h): a view
     of [B, H, S, D]-contiguous tensors, the layout users usually pass (the packed one copies them). Only where
     the ids are shared by the batch (``doc[q_idx]``, not ``doc[b, q_idx]``), so that one row's cu_seqlens serve
     every folded head, and the modifiers read neither ``b`` nor ``h`` (FA4 hands them the folded head and
     batch 0). GQA holds: FA4's q head i reads kv head i // g, and (b * Hq + h) // g == b * Hkv + h // g. out
     [S, B * H, Dv] -> [B, H, S, Dv] and lse [B * H, S] -> [B, H, S] come back as views, and so do the gradients
     (FA4 allocates them with ``empty_like`` of the folded q / k / v).

Direction by direction (``kernel_options={"varlen": ...}``): True runs the forward and the backward on the varlen
kernels, False neither (tile lists, the path of ``attnlang.backends.fa4``). Without the key (and unless the mask
is the equality alone with every document on a 128-row tile boundary: then every tile is full or empty and the
tile lists run without a mask_mod, as measured for BENCHMARKS.md's ``document`` row): the backward always
runs varlen (H200, GQA B=2 S=4096 random documents: 0.95 ms against 1.23 ms for tile lists); the forward runs
varlen from ``VARLEN_FORWARD_MIN_TOKENS`` packed tokens on (H200 shape suite, session 5, with the batch folded into
heads so nothing is copied: 2 x 4096 GQA 0.291 ms against 0.351 on tile lists, 4 x 4096 at head dim 64 0.381 against
0.444, 1 x 32768 1.074 against 1.268; before the fold the copy of q / k / v made tile lists faster at 2 x 4096;
shorter packs were not measured and keep the tile lists). A tile-list forward and a varlen backward are one autograd
function: FA4's lse of the dense forward ([B, H, S]) is permuted into the varlen layout ([H, B * S]) for the
backward, which recomputes P from it; both forwards give the same lse up to rounding. Folded, the dense forward
writes out into a [B, H, S, Dv] buffer and its lse [B, H, S] is already the folded [B * H, S].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ast import Const, Expr, Index, Var, walk
from ..emit_cute import VarlenPositions
from ..lower_torch import row_values
from ..memo import MEMO, IdentityMemo
from ..patterns import Documents, documents
from .fa4_replay import replayed

__all__ = ["Host", "Packing", "pack_documents", "route", "describe", "VARLEN_FORWARD_MIN_TOKENS"]

VARLEN_FORWARD_MIN_TOKENS = 8192  # packed tokens (B * S) from which the forward also runs varlen by default
_TILE = 128  # FA4's Hopper tile rows: documents on these boundaries leave the tile-list path no partial tile
_INT32_MAX = (1 << 31) - 1
_MAX_GRID_HEADS = 65535  # FA4's single-tile schedulers put the heads on the grid's y dimension (CUDA: < 2^16)
_FOLDED, _PACKED = "folded", "packed"


@dataclass(frozen=True)
class Host:
    """What this module uses of ``attnlang.backends.fa4`` (which imports this one, so it never imports fa4):
    flash() -> flash_attn.cute.interface; load(CuteModule) -> the imported module; aux(tensor) -> the tensor as
    aux_tensors hold it; tables(plan) -> the baked tables; option(plan, name) -> bool; native_window(score, mask,
    q_len, kv_len) -> FA4's (left, right) or None; kernel_arguments(q, k, v, plan) -> (k, v, flash_attn_func
    kwargs) of the tile-list path; pinnable(plan) -> whether the plan's memo may hold its named tensors (replays)."""

    flash: object
    load: object
    aux: object
    tables: object
    option: object
    native_window: object
    kernel_arguments: object
    pinnable: object


@dataclass(frozen=True)
class Packing:
    """The varlen sequences of one call. cu_seqlens: int32 [n + 1] on the device (0, ..., B * S); max_seqlen: the
    longest sequence; count: n; aligned: every sequence starts on a 128-row tile boundary."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    count: int
    aligned: bool = False


def pack_documents(doc: torch.Tensor, batch: int, length: int, batched: bool) -> Packing | None:
    """The runs of equal ids of ``doc`` as varlen sequences, or None when some id occurs in more than one run.

    Args:
        doc: integer or bool ids; [>= length] (shared by every batch row) or, batched, [>= batch, >= length].
        batch, length: the call's B and S; only ``doc[:length]`` (``doc[:batch, :length]``) is read.
        batched: whether ``doc`` has one row of ids per batch row.
    Returns:
        Packing with cu_seqlens on doc's device (each run's first position in the B * S rows packed batch row
        after batch row, then B * S), or None. Works on any device; costs three device syncs.
    """
    rows = doc[:batch, :length] if batched else doc[:length].unsqueeze(0)
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    change = rows[:, 1:] != rows[:, :-1]
    runs = change.sum(1)
    ordered = rows.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1)
    if not bool((runs == distinct).all()):
        return None  # an id that comes back after another: its positions are not one sequence
    starts = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    starts[:, 1:] = change
    if not batched:
        starts = starts.expand(batch, length)
    first = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([first, first.new_full((1,), batch * length)]).to(torch.int32)
    longest, aligned = torch.stack([(cu[1:] - cu[:-1]).max().long(), (cu % _TILE != 0).sum().long()]).tolist()
    return Packing(cu_seqlens=cu, max_seqlen=int(longest), count=int(cu.numel()) - 1, aligned=aligned == 0)


def _packing(plan, docs: Documents, batch: int | None = None) -> Packing | None:
    """The packing of the call's B rows (``batch`` None) or of ``batch`` rows (1: the folded layout's one row)."""
    doc = plan.tensors[docs.tensor]
    batch = plan.batch if batch is None else batch
    tag = f"varlen/{batch}/{plan.q_len}/{int(docs.batched)}"
    return MEMO.get(doc, tag, lambda t: pack_documents(t, batch, plan.q_len, docs.batched))


# ----- lowering of what is left inside a document -----

@dataclass(frozen=True, slots=True)
class VarlenLowering:
    """window: FA4's (left, right) flags inside each sequence; module: the generated CuteModule (positions made
    global) or None; score_mod / mask_mod: whether it defines them; tensors: aux_tensors names, in order;
    native: the words for describe(); per_row: whether the modifiers read ``b`` or ``h`` (directly or as an index
    of a tensor or table), which the folded layout would change."""

    window: tuple
    module: object
    score_mod: bool
    mask_mod: bool
    tensors: tuple
    native: str
    per_row: bool = False


@functools.lru_cache(maxsize=256)
def _lowering_cached(score: Expr, rest: Expr, q_len: int, batched: bool, fastmath: bool, tables: tuple,
                     window_flags: bool, native_window) -> VarlenLowering:
    from ..diff import derivative
    from ..emit_cute import emit_module
    from ..printer import to_source
    identity = isinstance(score, Var) and score.name == "score"
    mask_expr = None if isinstance(rest, Const) and rest.value is True else rest
    window, native = (None, None), "no mask inside a document"
    if mask_expr is not None:
        native = "mask_mod inside each document"
        w = native_window(score, rest, q_len, q_len) if window_flags else None
        if w is not None:
            window, mask_expr, native = w, None, f"kernel window flags {w} inside each document"
    score_expr = None if identity else score
    table_map = {name: (shape, values) for name, shape, values in tables}
    used = set()
    for e in (score_expr, mask_expr):
        if e is not None:
            used |= {n.tensor for n in walk(e) if isinstance(n, Index)}
    tensors = tuple(sorted(used - set(table_map)))
    read = {n.name for e in (score_expr, mask_expr) if e is not None for n in walk(e) if isinstance(n, Var)}
    per_row = bool(read & {"b", "h"})
    module = None
    if score_expr is not None or mask_expr is not None:
        header = f"varlen | score: {to_source(score)} | mask inside documents: {to_source(rest)}"
        module = emit_module(score_expr, mask_expr, None if identity else derivative(score), tensors,
                             fastmath=fastmath, header=header, tables=table_map,
                             positions=VarlenPositions(q_len, q_len, batched))
    return VarlenLowering(window, module, score_expr is not None, mask_expr is not None, tensors, native, per_row)


_LOWERED = IdentityMemo()


def _lowering(plan, docs: Documents, host: Host) -> VarlenLowering:
    fastmath, window_flags = host.option(plan, "fastmath"), host.option(plan, "window_flags")
    tables = host.tables(plan)
    extra = (docs.tensor, plan.q_len, plan.batch > 1, fastmath, tables, window_flags)
    return _LOWERED.get((plan.score, plan.mask), extra, lambda: _lowering_cached(
        plan.score, docs.rest, plan.q_len, plan.batch > 1, fastmath, tables, window_flags, host.native_window))


# ----- when the path applies, and which direction runs where -----

_DOCS = IdentityMemo()


_UNSET = object()


def _documents(plan) -> Documents | None:
    memo = getattr(plan, "memo", None)  # kept with the plan as well: a dict lookup per warm call
    if memo is None:
        return _DOCS.get((plan.mask,), None, lambda: documents(plan.mask))
    got = memo.get("varlen_documents", _UNSET)
    if got is _UNSET:
        got = memo["varlen_documents"] = _DOCS.get((plan.mask,), None, lambda: documents(plan.mask))
    return got


def _choice(q, k, v, plan):
    """(docs, packing, forward_varlen, backward_varlen) when this call takes the varlen path, else None."""
    forced = plan.options.get("varlen")
    if forced is False or getattr(plan, "sink", None) is not None or getattr(plan, "normalize", True) is False:
        return None  # sinks and unnormalised attention have no varlen lowering here
    docs = _documents(plan)
    if docs is None or plan.q_len != plan.kv_len or docs.tensor not in plan.tensors:
        return None
    if q.shape[-1] % 32 or v.shape[-1] % 32 or plan.batch * plan.q_len > _INT32_MAX:
        return None  # head dims the SM90 varlen backward was not verified at; packed indices are int32
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    forward = forced is True or plan.batch * plan.q_len >= VARLEN_FORWARD_MIN_TOKENS
    if not forward and not grads:
        return None  # an inference call whose forward runs on tile lists: the plain fa4 path
    packing = _packing(plan, docs)
    if packing is None:
        return None
    if forced is None and packing.aligned and isinstance(docs.rest, Const) and docs.rest.value is True:
        return None  # whole documents on tile boundaries: every tile full or empty, the tile lists need no mask
    return docs, packing, forward, grads


def _expanded(q, k, v, grads: bool, low: VarlenLowering):
    """k / v as the kernel gets them: expanded to the query heads for a backward with modifiers (as in
    fa4.kernel_arguments: FA4's grouped backward is not trusted with modifiers), else as given."""
    if grads and k.shape[1] != q.shape[1] and low.module is not None:
        group = q.shape[1] // k.shape[1]
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return k, v


def _packed_view(t: torch.Tensor) -> bool:
    """Whether [B, H, S, D] ``t`` reshapes to the packed [B * S, H, D] without a copy."""
    B, _, S, _ = t.shape
    return B == 1 or S == 1 or t.stride(0) == S * t.stride(2)


def _folded_view(t: torch.Tensor) -> bool:
    """Whether [B, H, S, D] ``t`` reshapes to the folded [S, B * H, D] without a copy."""
    B, H = t.shape[0], t.shape[1]
    return B == 1 or H == 1 or t.stride(0) == H * t.stride(1)


def _layout(q, k, v, plan, docs: Documents, low: VarlenLowering) -> tuple[str, tuple[str, ...]]:
    """(``_FOLDED`` or ``_PACKED``, the names of the tensors among q / k / v that layout copies). q / k / v are
    [B, H, S, D] as the kernel gets them (after ``_expanded``). Folded only where it is exact (ids shared by the
    batch, modifiers reading neither b nor h, B * Hq heads on FA4's grid) and copies fewer tensors."""
    named = (("q", q), ("k", k), ("v", v))
    packed = tuple(n for n, t in named if not _packed_view(t))
    if (packed and plan.batch > 1 and not docs.batched and not low.per_row
            and plan.batch * q.shape[1] <= _MAX_GRID_HEADS):
        folded = tuple(n for n, t in named if not _folded_view(t))
        if len(folded) < len(packed):
            return _FOLDED, folded
    return _PACKED, packed


def _layout_words(layout: str, copies: tuple) -> str:
    copied = "one copy of " + ", ".join(copies)
    if layout == _FOLDED:
        return "folded batch into heads (" + ("no copy" if not copies else copied) + ")"
    return "packed view" if not copies else copied


def describe(q, k, v, plan, host: Host) -> str:
    """Which path an fa4 call takes for packed documents, in words (for the benchmark's notes): the directions,
    the layout of q / k / v ("folded batch into heads (no copy)", "packed view", "one copy of q, k, v"), the
    sequences of one varlen call and what runs inside them."""
    got = _choice(q, k, v, plan)
    if got is None:
        return "tile lists (no varlen: " + ("kernel_options varlen=False" if plan.options.get("varlen") is False
                                             else "not packed documents, or ids not in contiguous runs") + ")"
    docs, packing, forward, backward = got
    low = _lowering(plan, docs, host)
    layout, copies = _layout(q, *_expanded(q, k, v, backward, low), plan, docs, low)
    if layout == _FOLDED:
        packing = _packing(plan, docs, 1)
    where = ("varlen forward" if forward else "tile-list forward") + (" + varlen backward" if backward else "")
    return (f"{where}; {_layout_words(layout, copies)}; {packing.count} sequences, longest {packing.max_seqlen}; "
            f"{low.native}")


# ----- running it -----

def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> [B * S, H, D]: a view where the strides allow, else one copy."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])


def _fold(t: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> [S, B * H, D] (batch b head h -> head b * H + h): a view where the strides allow (a
    [B, H, S, D]-contiguous tensor transposed), else one copy."""
    return t.transpose(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2], t.shape[3])


def _to_varlen(t: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, S, H, D] -> the varlen layout's [total, heads, D]."""
    return _fold(t) if layout == _FOLDED else _flat(t)


def _from_varlen(t: torch.Tensor, shape, layout: str) -> torch.Tensor:
    """The inverse of ``_to_varlen`` to [B, S, H, D] ``shape`` (a view for FA4's gradients, allocated with
    ``empty_like`` of the varlen inputs)."""
    if layout == _FOLDED:
        return t.reshape(shape[1], shape[0], shape[2], shape[3]).transpose(0, 1)
    return t.reshape(shape)


class _Documents(torch.autograd.Function):
    """Forward on tile lists (``dense`` = flash_attn_func-style kwargs) or varlen; backward on varlen.
    Inputs q / k / v are [B, S, H, D]; outputs out and lse in the varlen layout of ``run["layout"]``:
    packed out [B * S, H, Dv], lse [H, B * S]; folded out [S, B * H, Dv], lse [B * H, S]."""

    @staticmethod
    def forward(ctx, q, k, v, run):
        fa, layout = run["fa"], run["layout"]
        B, S, H = q.shape[0], q.shape[1], q.shape[2]
        if run["dense"] is not None:
            if layout == _FOLDED:
                # out written into a [B, H, S, Dv] buffer: its [S, B * H, Dv] fold is a view, and FA4's lse
                # [B, H, S] is already the folded [B * H, S]
                buf = torch.empty(B, H, S, v.shape[3], dtype=q.dtype, device=q.device)
                dense, into = run["dense"], buf.transpose(1, 2)
                lse = _replayed(run, "dense_folded", True, lambda: fa._flash_attn_fwd(q, k, v, out=into, **dense),
                                (q, k, v, into), (dense.get("aux_tensors"), dense.get("block_sparse_tensors")))[1]
                out, lse = _fold(buf.transpose(1, 2)), lse.view(B * H, S)
            else:
                dense = run["dense"]
                out, lse = _replayed(run, "dense", True, lambda: fa._flash_attn_fwd(q, k, v, **dense), (q, k, v),
                                     (dense.get("aux_tensors"), dense.get("block_sparse_tensors")))[:2]
                out = out.view(B * S, out.shape[2], out.shape[3])
                lse = lse.permute(1, 0, 2).reshape(lse.shape[1], B * S)  # [B, H, S] -> [H, B * S]: 4 bytes a row
            saved = (q, k, v)
        else:
            saved = tuple(_to_varlen(t, layout) for t in (q, k, v))
            out, lse = _replayed(run, "fwd", True, lambda: fa._flash_attn_fwd(
                *saved, causal=False, return_lse=True, **run["varlen"]), saved, _constants(run["varlen"]))[:2]
        # the aux tensors too (often the caller's named tensor itself): the backward's score_mod_bwd reads them
        # again, so an in-place write before it is autograd's error, as in eager, not gradients of new values
        ctx.save_for_backward(*saved, out, lse, *(run["varlen"]["aux_tensors"] or ()))
        ctx.run, ctx.shapes = run, (q.shape, k.shape, v.shape)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors[:5]
        run = ctx.run
        layout = run["layout"]
        if dout is None:
            dout = torch.zeros_like(out)
        q, k, v = (t if t.dim() == 3 else _to_varlen(t, layout) for t in (q, k, v))
        dout = dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        # dq accumulates with fp32 atomics: a replay's check compares within a tolerance (fa4_replay)
        dq, dk, dv = _replayed(run, "bwd", False, lambda: run["fa"]._flash_attn_bwd(
            q, k, v, out, dout, lse, causal=False, score_mod_bwd=run["score_mod_bwd"], dlse=dlse, **run["varlen"]),
            (q, k, v, out, dout, lse, dlse), _constants(run["varlen"]))[:3]
        return (*(_from_varlen(g, shape, layout) for g, shape in zip((dq, dk, dv), ctx.shapes)), None)


def _constants(varlen: dict) -> tuple:
    """The per-plan tensors among the varlen call's arguments (cu_seqlens, aux tensors): what a replay keeps."""
    return (varlen["cu_seqlens_q"], varlen["cu_seqlens_k"], varlen["aux_tensors"])


def _replayed(run: dict, part: str, exact: bool, call, inputs, constants):
    """One of the call's FA4 host calls (``part``: "fwd", "dense" or "bwd"), through its Replay where the call has
    a replay key (``route``), else FA4's own call."""
    key = run["replay"]
    return replayed(run["memo"], None if key is None else key + (part,), exact, call, inputs, constants,
                    (run["fa"],))


def route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, host: Host):
    """(out, lse) of the call on FA4's varlen path, or None when the call does not take it (see the module
    docstring); out [B, Hq, S, Dv] in q's dtype, lse float32 [B, Hq, S] plus plan.lse_shift (None when neither
    the caller nor a backward needs it)."""
    got = _choice(q, k, v, plan)
    if got is None:
        return None
    docs, packing, forward, grads = got
    fa = host.flash()
    low = _lowering(plan, docs, host)
    mod = host.load(low.module) if low.module is not None else None
    score_mod = getattr(mod, "score_mod", None) if low.score_mod else None
    score_mod_bwd = getattr(mod, "score_mod_bwd", None) if low.score_mod else None
    mask_mod = getattr(mod, "mask_mod", None) if low.mask_mod else None
    aux = [MEMO.get(plan.tensors[n], "aux", host.aux) for n in low.tensors] or None
    B, S = plan.batch, plan.q_len
    k, v = _expanded(q, k, v, grads, low)
    layout = _layout(q, k, v, plan, docs, low)[0]
    if layout == _FOLDED:
        packing = _packing(plan, docs, 1)  # one row's documents, shared by every folded head
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cu, m = packing.cu_seqlens, packing.max_seqlen
    varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, softmax_scale=plan.scale,
                  window_size_left=low.window[0], window_size_right=low.window[1], score_mod=score_mod,
                  mask_mod=mask_mod, aux_tensors=aux)
    H, Dv = q.shape[1], v.shape[-1]
    # warm signatures replay FA4's recorded launches (attnlang.backends.fa4_replay): everything the calls take
    # besides q / k / v is the plan's (cu_seqlens and aux tensors per tensor version, the lowering per plan)
    replay = None
    if (host.option(plan, "replay") and not (q.is_cuda and torch.cuda.is_current_stream_capturing())
            and host.pinnable(plan)):
        replay = ("varlen", grads, forward, layout, plan.return_lse, q.shape, k.shape, v.shape, q.dtype, q.device)
    if not grads:
        ins = tuple(_to_varlen(t, layout) for t in (qt, kt, vt))
        out, lse = replayed(plan.memo, replay, True, lambda: fa._flash_attn_fwd(
            *ins, causal=False, return_lse=plan.return_lse, **varlen), ins, _constants(varlen), (fa,))[:2]
    else:
        dense = None
        if not forward:
            with torch.no_grad():  # no grads: kernel_arguments then never expands k / v (done above if needed)
                _, _, kwargs = host.kernel_arguments(q, k, v, plan)
            left, right = kwargs.pop("window_size")
            kwargs.pop("score_mod_bwd")
            kwargs.pop("block_sparse_tensors_bwd")
            dense = dict(kwargs, window_size_left=left, window_size_right=right, return_lse=True)
        run = {"fa": fa, "dense": dense, "varlen": varlen, "score_mod_bwd": score_mod_bwd, "layout": layout,
               "memo": plan.memo, "replay": replay}
        out, lse = _Documents.apply(qt, kt, vt, run)
    if layout == _FOLDED:
        out = out.view(S, B, H, Dv).permute(1, 2, 0, 3)
        lse = None if lse is None else lse.view(B, H, S)
    else:
        out = out.view(B, S, H, Dv).transpose(1, 2)
        lse = None if lse is None else lse.view(H, B, S).permute(1, 0, 2)
    if lse is not None and plan.lse_shift is not None:
        lse = lse + row_values(plan.lse_shift, plan.batch, plan.q_heads, plan.q_len, plan.kv_len,
                               plan.tensors, torch.float32, q.device)
    return out, lse
