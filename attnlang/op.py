"""A variant's call as one PyTorch custom operator, so ``torch.compile`` sees one opaque node (and one for its
backward) instead of tracing attnlang's host code.

``torch.ops.attnlang.attention(q, k, v, tensors, key, wanted) -> (out, lse)`` (defined with
``torch.library.Library``: a CompositeExplicitAutograd kernel, a fake implementation and an explicit Autograd
kernel; ``wanted``: ``grad_bits``):
- ``key`` (str) names the call: the variant's config, backend, scale, return_lse, kernel_options and the names of
  ``tensors`` (the named tensors, sorted by name), as JSON. The Variant itself cannot be an op argument; ``key``
  is registered when Dynamo traces the call (``call``) and rebuilt from its JSON in a process that did not trace.
- the fake (meta) implementation runs every check that reads no values, on FakeTensors, at trace time: shapes,
  dtypes, devices, missing / extra / mis-typed tensors, the expressions' typing with this call's tensor dtypes
  (AttnLangError with its caret). It gives out [B, Hq, Sq, Dv] in q's dtype (strides of a [B, Sq, Hq, Dv] buffer,
  FA4's and SDPA's layout, so a following ``transpose(1, 2)`` is free) and lse [B, Hq, Sq] float32.
- the real implementation is the eager-mode call ``variant(q, k, v, ...)``: the checks that read values (index
  bounds from value ranges, NaN scores, block sparsity; cached per tensor version as in eager mode), then the
  backend. Nothing is skipped under compilation.
- the backward, ``torch.ops.attnlang.attention_backward``, runs the backend's own backward on what its forward
  kept (``GRAPHS``): the backward a backend handed over (``attnlang.plan.give_direct_backward``; fa4 hands FA4's
  _flash_attn_bwd over where gradients go to q, k, v only), else the autograd graph the backend's forward recorded
  (recomputed under autograd where none was kept): one opaque node too. Gradients flow to q, k, v and to floating
  named tensors.

Under an outer ``torch.compile`` every backend is called through this op, also flex: its own compiled
flex_attention runs inside the op's real implementation (opaque), not traced into the outer graph.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from typing import Any, Mapping

import torch

from .errors import AttnLangError
from .plan import request_direct_backward, take_direct_backward

__all__ = ["call", "call_key", "grad_bits", "register", "spec_of", "variant_of_op_config", "set_loader",
           "TraceTimeError", "GRAPHS"]

_SPECS: dict[str, tuple] = {}  # key -> (variant, backend, scale, return_lse, kernel_options, names)
# config JSON -> a live Variant with that config: what a key's variant part names. Weak, so variants that are
# never called under torch.compile go as usual; a traced call's variant is held by _SPECS.
_VARIANTS: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_LOADER = None  # config -> Variant (attnlang.variant.from_config, set there: this module never imports Variant)


def set_loader(loader) -> None:
    """Where ``spec_of`` rebuilds a variant from its config (``attnlang.variant`` sets ``from_config``)."""
    global _LOADER
    _LOADER = loader


class TraceTimeError(AttnLangError, torch._dynamo.exc.Unsupported, IndexError):
    """An AttnLangError found while torch.compile traces a call (bad shapes, dtypes, tensors, typing), raised from
    the op's fake implementation. Also one of the two errors Dynamo lets out of a fake implementation unwrapped
    (torch 2.11 passes only its own Unsupported, 2.13 also IndexError): with fullgraph=True the caller gets the
    AttnLangError itself, caret included; without, Dynamo breaks the graph there and the eager call raises it."""

    @classmethod
    def of(cls, e: AttnLangError) -> "TraceTimeError":
        err = cls(e.message, e.source, e.line, e.column, e.length, e.where)
        # AttnLangError's base (ValueError) does not chain __init__: Dynamo's bookkeeping fields set here
        torch._dynamo.exc.Unsupported.__init__(err, str(err), "attnlang trace-time check")
        return err


def _json_options(options) -> Any:
    if options is None:
        return None
    if not isinstance(options, Mapping):
        return repr(options)  # refused by the fake implementation's checks, with the eager message
    try:
        json.dumps(dict(options), sort_keys=True)
    except (TypeError, ValueError):
        return {"__repr__": repr(dict(options))}
    return dict(options)


def register(variant, config: Mapping[str, Any]) -> str:
    """The variant part of its calls' keys (its config as JSON), recorded so ``call_key`` finds the variant from
    a string. Called once per Variant, when it is built (never while Dynamo traces)."""
    text = json.dumps(dict(config), sort_keys=True, default=repr)
    _VARIANTS.setdefault(text, variant)
    return text


def variant_of_op_config(variant_config: str):
    """The Variant that ``register`` named ``variant_config`` (rebuilt from the config if none is alive)."""
    variant = _VARIANTS.get(variant_config)
    if variant is None:
        if _LOADER is None:
            raise AttnLangError("torch.ops.attnlang.attention was called before attnlang.variant was imported")
        variant = _LOADER(json.loads(variant_config))
    return variant


@torch._dynamo.assume_constant_result
def call_key(variant_config: str, backend, scale, return_lse, kernel_options, names) -> str:
    """The op's ``key`` for one kind of call, registered for the run-time lookup. Dynamo runs this function at
    trace time (``assume_constant_result``): its result is a constant of the graph, never traced. Its arguments
    are plain constants (Dynamo of torch 2.11 passes no other object to such a function): the variant comes as
    ``register``'s string."""
    text = json.dumps({"variant": json.loads(variant_config), "backend": backend, "scale": scale,
                       "return_lse": return_lse, "options": _json_options(kernel_options), "names": list(names)},
                      sort_keys=True, default=repr)
    if text not in _SPECS:
        _SPECS[text] = (variant_of_op_config(variant_config), backend, scale, return_lse,
                        None if kernel_options is None else dict(kernel_options), tuple(names))
    return text


def spec_of(key: str) -> tuple:
    """(variant, backend, scale, return_lse, kernel_options, names) of ``key``; rebuilt from its JSON when this
    process did not trace the call (a graph loaded from a compile cache)."""
    got = _SPECS.get(key)
    if got is not None:
        return got
    if _LOADER is None:
        raise AttnLangError("torch.ops.attnlang.attention was called before attnlang.variant was imported")
    try:
        d = json.loads(key)
        options = d["options"]
        if isinstance(options, dict) and "__repr__" in options:
            raise AttnLangError(f"the compiled graph calls attnlang with kernel_options {options['__repr__']}, which "
                                f"are not JSON and cannot be rebuilt in this process; trace the call again")
        got = (_LOADER(d["variant"]), d["backend"], d["scale"], d["return_lse"], options, tuple(d["names"]))
    except (ValueError, KeyError, TypeError) as e:
        raise AttnLangError(f"torch.ops.attnlang.attention got a key that attnlang did not make: {e}") from None
    _SPECS[key] = got
    return got


def _run(q, k, v, tensors, key):
    """The call ``key`` on these tensors, in the dispatch state the caller set (``_restored``)."""
    variant, backend, scale, return_lse, options, names = spec_of(key)
    # the op's lse output is always the call's lse: a kernel writes it for next to nothing, where zeros in its
    # place cost an allocation and a fill launch per call (~20 us of host time on the H200)
    return variant._eager_call(q, k, v, scale, backend, True, options, dict(zip(names, tensors)))


# Keys an op's implementation may find excluded and that the backends need: autograd (the backward's recompute),
# functorch (flex builds its BlockMask with vmap), and the Python-dispatch keys a nested torch.compile's fake
# tensors go through (a compiled training graph's first run excludes PythonTLSSnapshot, Functionalize and
# PreDispatch; flex's own compile under it failed with "tls_on_entry.has_value() INTERNAL ASSERT FAILED" in
# PythonFallbackKernel.cpp, which a Python-key tensor reaching the Python fallback without its TLS snapshot gives).
# Names torch does not expose (Batched, VmapMode in 2.11 / 2.13) are skipped.
_KEY_NAMES = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView",
              "FuncTorchDynamicLayerBackMode", "FuncTorchDynamicLayerFrontMode", "FuncTorchBatched",
              "FuncTorchVmapMode", "FuncTorchGradWrapper", "Batched", "BatchedNestedTensor", "VmapMode", "Conjugate",
              "Negative", "ZeroTensor", "PythonTLSSnapshot", "Functionalize", "PreDispatch")
_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in _KEY_NAMES if hasattr(torch._C.DispatchKey, name))
# the keys' functionality bits: one AND tells whether any of them is excluded (the common case: none)
_KEYS_RAW = 0
for _key in _KEYS:
    _KEYS_RAW |= torch._C.DispatchKeySet(_key).raw_repr()
del _key


def _dispatch_plain() -> bool:
    """True when the dispatcher's state needs no restoring (``_dispatch_restored`` would do nothing): no key of
    ``_KEYS`` excluded, no dispatch mode set. A compiled graph's later runs: the op's kernels redispatch below
    autograd without excluding it (``_attention_autograd``)."""
    return (not torch._C._dispatch_tls_local_exclude_set().raw_repr() & _KEYS_RAW
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._ops._len_torch_dispatch_stack_pre_dispatch() == 0)


@contextlib.contextmanager
def _dispatch_restored():
    """The dispatcher's ordinary state inside a custom op's implementation. On a compiled graph's first run the op
    runs below a Python dispatch mode (AOTAutograd's checks) with keys above Python excluded, which breaks the vmap
    in flex's BlockMask construction; a caller may have excluded autograd (``_AutoDispatchBelowAutograd``), which
    the backward's recompute needs. Restored on exit; the caller's dispatch modes are set aside meanwhile."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    keys = [key for key in _KEYS if excluded.has(key)]
    # what _disable_current_modes pops: the dispatch mode stack (infra modes included) and the pre-dispatch one
    modes = torch._C._len_torch_dispatch_stack() > 0 or torch._ops._len_torch_dispatch_stack_pre_dispatch() > 0
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        if modes:
            stack.enter_context(torch.utils._python_dispatch._disable_current_modes())
        yield


def _restored(fn, *args):
    """``fn(*args)`` in the dispatcher's ordinary state (``_dispatch_restored``), without entering a context
    manager where nothing is to restore (~5 us less per call on the CPU)."""
    if _dispatch_plain():
        return fn(*args)
    with _dispatch_restored():
        return fn(*args)


def _bshd_like(out: torch.Tensor) -> torch.Tensor:
    """``out`` [B, H, S, D] with the strides the fake implementation promises (a [B, S, H, D] buffer)."""
    B, H, S, D = out.shape
    if out.stride() == (S * H * D, D, H * D, 1) or out.numel() == 0:
        return out
    buf = torch.empty(B, S, H, D, dtype=out.dtype, device=out.device).transpose(1, 2)
    buf.copy_(out)
    return buf


def grad_bits(q, k, v, tensors) -> int:
    """Bit i set when input i (q, k, v, then the named tensors in order) is floating and needs a gradient. Computed
    while Dynamo traces (from the fake tensors' requires_grad and the grad mode): a constant of the graph, because
    inside a compiled forward no intermediate requires grad and the op could not tell."""
    if not torch.is_grad_enabled():
        return 0
    bits = 0
    for i, t in enumerate((q, k, v, *tensors)):
        if t.requires_grad and t.is_floating_point():
            bits |= 1 << i
    return bits


def _leaves(inputs, wanted: int) -> list:
    # an input without gradients goes as itself, not as a new detached alias: the warm plan's key and the
    # backends' per-tensor memos (cu_seqlens, aux conversions, FA4 replays) hold the named tensors by object, so a
    # new alias per call planned every training call again and no replay was ever reached
    return [t.detach().requires_grad_(True) if wanted >> i & 1 else (t.detach() if t.requires_grad else t)
            for i, t in enumerate(inputs)]


class _Graphs:
    """The backend's own autograd graph of a forward call, kept from the op's forward until its backward, so the
    backward runs the backend's backward on what its forward saved: no second forward. Keyed by the memory of the
    op's output ``out`` (the backward gets another tensor object over the same memory: AOTAutograd saves a copy or
    a detached alias); an entry holds that memory (``out``'s storage), so while it lives no other tensor can be
    allocated there and a key names one forward only.

    An entry goes with the ``out`` the forward returned (a forward whose backward never runs), but not at once: the
    last such orphan stays until its backward takes it, the next forward starts or the next orphan replaces it.
    So the backward still finds its graph where ``out`` died right before it: an activation-checkpointing recompute
    in a compiled backward (AOTAutograd detaches the recomputed ``out`` and drops it), or ``f(x).sum().backward()``
    where ``out`` is what the compiled region returned. At most one orphaned graph is held longer than its
    output, and none past the next forward."""

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}
        self._orphan: tuple | None = None  # (key, graph, storage): the entry whose out died last

    @staticmethod
    def _key(out: torch.Tensor) -> tuple:
        return (out.data_ptr(), out.device, out.dtype, out.shape, out.stride())

    def put(self, out: torch.Tensor, graph: tuple) -> None:
        self._orphan = None  # a new forward: the last orphan's backward did not come right after it
        key = self._key(out)
        entries = self._entries

        def gone(ref, key=key):  # out was freed: its entry (if still this one) becomes the orphan
            hit = entries.get(key)
            if hit is not None and hit[0] is ref:
                del entries[key]
                self._orphan = (key, hit[1], hit[2])

        # a weakref's callback: ~3 us less than weakref.finalize
        entries[key] = (weakref.ref(out, gone), graph, out.untyped_storage())

    def take(self, out: torch.Tensor):
        key = self._key(out)
        hit = self._entries.pop(key, None)
        if hit is not None:
            return hit[1]
        orphan = self._orphan
        if orphan is not None and orphan[0] == key:
            self._orphan = None
            return orphan[1]
        return None

    def __len__(self) -> int:
        return len(self._entries) + (self._orphan is not None)


GRAPHS = _Graphs()


def _finish(q, o, l, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's outputs from the backend's: out detached, in q's dtype, with the promised strides, aliasing no
    input; lse detached, float32, contiguous (zeros where the backend gave none). Each step only where needed: a
    no-op ``.to`` / ``.contiguous`` still costs a dispatch."""
    if not isinstance(l, torch.Tensor):
        l = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    out = o.detach() if o.requires_grad else o
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    out = _bshd_like(out)
    if out.numel():
        ptr = out.data_ptr()
        if any(ptr == t.data_ptr() for t in inputs if t.numel()):
            out = _bshd_like(out.clone())  # a custom op's outputs must not alias its inputs
    if l.requires_grad:
        l = l.detach()
    if l.dtype != torch.float32:
        l = l.float()
    if not l.is_contiguous():
        l = l.contiguous()
    return out, l


# The two ops, defined with torch.library.Library rather than torch.library.custom_op: the same schemas, fake
# implementations and autograd, without custom_op's per-call Python layers (its autograd kernel's pytree handling
# and fill_defaults, its backend wrapper's alias check, a Dynamo-disabling wrapper): ~25 us less per eager call
# with gradients, a few us per call inside a compiled graph (benchmarks/bench_op_host.py).
_LIB = torch.library.Library("attnlang", "DEF")
_TAGS = (torch.Tag.pt2_compliant_tag,)
_LIB.define("attention(Tensor q, Tensor k, Tensor v, Tensor[] tensors, str key, SymInt wanted) -> (Tensor, Tensor)",
            tags=_TAGS)
_LIB.define("attention_backward(Tensor q, Tensor k, Tensor v, Tensor[] tensors, Tensor out, Tensor lse, "
            "Tensor grad_out, Tensor grad_lse, str key, SymInt wanted) -> (Tensor, Tensor, Tensor, Tensor[])",
            tags=_TAGS)
_ATTENTION = torch.ops.attnlang.attention.default
_BACKWARD = torch.ops.attnlang.attention_backward.default
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_set_grad_enabled = torch._C._set_grad_enabled


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor], key: str,
              wanted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.attnlang.attention``'s implementation: out [B, Hq, Sq, Dv] (q's dtype, [B, Sq, Hq, Dv]
    strides), lse [B, Hq, Sq] float32 of the call ``key``.

    ``wanted`` (``grad_bits``): which inputs need gradients. With any, the backend runs under autograd (so it
    picks the kernel it picks for training, as outside compile) and its graph is kept for the backward."""
    inputs = (q, k, v, *tensors)
    grad_was = torch.is_grad_enabled()
    if not wanted:
        _set_grad_enabled(False)
        try:
            o, l = _restored(_run, q, k, v, tensors, key)
        finally:
            _set_grad_enabled(grad_was)
        return _finish(q, o, l, inputs)
    leaves = _leaves(inputs, wanted)
    # gradients to q / k / v only: the backend may hand its backward over instead of an autograd graph
    direct = not wanted >> 3
    if direct:
        request_direct_backward()
    _set_grad_enabled(True)
    try:
        o, l = _restored(_run, leaves[0], leaves[1], leaves[2], leaves[3:], key)
    finally:
        _set_grad_enabled(grad_was)
        backward = take_direct_backward() if direct else None
    # always a new tensor over o's memory (GRAPHS keeps o; the entry goes with out)
    out, lse = _finish(q, o.detach(), l, inputs)
    GRAPHS.put(out, (o, l, leaves) if backward is None else _Direct(backward))
    return out, lse


class _Direct:
    """A GRAPHS entry for a backward the backend handed over (``attnlang.plan.give_direct_backward``)."""

    __slots__ = ("backward",)

    def __init__(self, backward):
        self.backward = backward


def _attention_fake(q, k, v, tensors, key, wanted):
    variant, backend, scale, return_lse, options, names = spec_of(key)
    try:
        variant._static_checks(q, k, v, scale, backend, return_lse, options, dict(zip(names, tensors)))
    except AttnLangError as e:
        raise TraceTimeError.of(e) from None
    B, Hq, Sq, _ = q.shape
    Dv = v.shape[-1]
    out = q.new_empty((B, Sq, Hq, Dv)).transpose(1, 2)
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


def _backend_backward(inputs, out, grad_out, grad_lse, key, wanted, needing):
    graph = GRAPHS.take(out)
    if type(graph) is _Direct:
        # the backend's own backward, no autograd: gradients of q, k, v (needing names no named tensor here)
        grad_lse = grad_lse if spec_of(key)[3] else None
        got = graph.backward(grad_out if grad_out.dtype == out.dtype else grad_out.to(out.dtype), grad_lse)
        return [got[i] for i in needing]
    if graph is None:
        leaves = _leaves(inputs, wanted)
        o, l = _run(leaves[0], leaves[1], leaves[2], leaves[3:], key)
    else:
        o, l, leaves = graph
    outs = [o]
    gouts = [grad_out if grad_out.dtype == o.dtype else grad_out.to(o.dtype)]
    # lse's gradient only where the caller sees lse: otherwise it is zero
    if spec_of(key)[3] and isinstance(l, torch.Tensor) and l.requires_grad:
        outs.append(l)
        gouts.append(grad_lse if grad_lse.dtype == l.dtype else grad_lse.to(l.dtype))
    return _grad(outs, [leaves[i] for i in needing], gouts)


def _grad(outs, inputs, gouts):
    """``torch.autograd.grad(outs, inputs, gouts, allow_unused=True)``: the engine called as autograd.grad calls
    it, without its argument normalisation (the gradients have the outputs' shapes and dtypes already)."""
    if _engine_run_backward is None:
        return torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
    return _engine_run_backward(tuple(outs), tuple(gouts), False, False, tuple(inputs), True, accumulate_grad=False)


try:
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - a torch without it: the public API
    _engine_run_backward = None


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor],
                       out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor,
                       key: str, wanted: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``torch.ops.attnlang.attention_backward``'s implementation: (dq, dk, dv, [d tensor for each of
    ``tensors``]) of the call ``key``; ``wanted``: bit i set when input i (q, k, v, then tensors) needs a gradient
    (others come back as zeros, named ones of size 0).

    Runs the backend's backward on the graph its forward kept (``GRAPHS``); where none was kept (a second
    backward through the same graph, a forward recomputed by activation checkpointing) the forward is recomputed
    under autograd first."""
    inputs = (q, k, v, *tensors)
    needing = [i for i in range(len(inputs)) if wanted >> i & 1]
    grads: list = [None] * len(inputs)
    if needing:
        grad_was = torch.is_grad_enabled()
        _set_grad_enabled(True)  # the engine too: the eager backend checkpoints
        try:
            got = _restored(_backend_backward, inputs, out, grad_out, grad_lse, key, wanted, needing)
        finally:
            _set_grad_enabled(grad_was)
        for i, g in zip(needing, got):
            grads[i] = g
    result = []
    for i, t in enumerate(inputs):
        g = grads[i]
        if g is None:
            g = torch.zeros_like(t) if i < 3 or wanted >> i & 1 else t.new_zeros((0,))
        if g.dtype != t.dtype:
            g = g.to(t.dtype)
        if i < 3:
            if g.stride() != t.stride():
                # the fake's layout: empty_like(t), t's own strides where t is dense (q / k / v given as
                # transposed [B, S, H, D] buffers get gradients in that layout, no copy where the backend's are)
                g = torch.empty_like(t).copy_(g)
        elif not g.is_contiguous():
            g = g.contiguous()
        result.append(g)
    return result[0], result[1], result[2], result[3:]


def _attention_backward_fake(q, k, v, tensors, out, lse, grad_out, grad_lse, key, wanted):
    named = [torch.empty_like(t, memory_format=torch.contiguous_format) if wanted >> (3 + i) & 1
             else t.new_empty((0,)) for i, t in enumerate(tensors)]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), named


class _AttentionFunction(torch.autograd.Function):
    """The op's autograd (what ``register_autograd`` would build): saves q, k, v, out, lse and the named tensors;
    its backward is ``attention_backward``, one opaque op. Named tensors come flattened after q, k, v."""

    @staticmethod
    def forward(ctx, keyset, key, wanted, q, k, v, *tensors):
        out, lse = _ATTENTION.redispatch(keyset & _AFTER_AUTOGRAD, q, k, v, list(tensors), key, wanted)
        ctx.key, ctx.wanted = key, wanted
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        dq, dk, dv, dnamed = _BACKWARD(q, k, v, tensors, out, lse, grad_out, grad_lse, ctx.key, ctx.wanted)
        named = [g if ctx.wanted >> (3 + i) & 1 else None for i, g in enumerate(dnamed)]
        return None, None, None, dq, dk, dv, *named


class _BackwardFunction(torch.autograd.Function):
    """``attention_backward`` where its inputs need gradients (a double backward): runs it, and refuses the
    backward through it."""

    @staticmethod
    def forward(ctx, keyset, key, wanted, n, q, k, v, out, lse, grad_out, grad_lse, *tensors):
        dq, dk, dv, dnamed = _BACKWARD.redispatch(keyset & _AFTER_AUTOGRAD, q, k, v, list(tensors), out, lse,
                                                  grad_out, grad_lse, key, wanted)
        return dq, dk, dv, *dnamed

    @staticmethod
    def backward(ctx, *grads):
        raise AttnLangError("attnlang's attention has no double backward (a gradient of its gradients); "
                            "torch.ops.attnlang.attention_backward is not differentiable")


def _attention_autograd(keyset, q, k, v, tensors, key, wanted):
    """The op's Autograd kernel. Without gradients it redispatches below autograd without excluding it (what
    ``_AutoDispatchBelowAutograd`` would do), so the implementation finds the dispatcher's state as it was and
    restores nothing (the backend's own autograd graph for the backward is built there)."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(q, k, v, tensors):
        return _AttentionFunction.apply(keyset, key, wanted, q, k, v, *tensors)
    return _ATTENTION.redispatch(keyset & _AFTER_AUTOGRAD, q, k, v, tensors, key, wanted)


def _attention_backward_autograd(keyset, q, k, v, tensors, out, lse, grad_out, grad_lse, key, wanted):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(q, k, v, tensors, out, lse, grad_out, grad_lse):
        got = _BackwardFunction.apply(keyset, key, wanted, len(tensors), q, k, v, out, lse, grad_out, grad_lse,
                                      *tensors)
        return got[0], got[1], got[2], list(got[3:])
    return _BACKWARD.redispatch(keyset & _AFTER_AUTOGRAD, q, k, v, tensors, out, lse, grad_out, grad_lse, key,
                                wanted)


def _never_traced(*fns) -> bool:
    """Dynamo never traces these kernels, nor what they call, where they run eagerly under an active
    ``torch.compile`` (a frame Dynamo skips calling the op): their frames and all below run as plain Python. What
    custom_op gets from a ``torch._dynamo.disable`` wrapper per call; here a flag on the code objects, free per
    call. False where this torch lacks the (private) flag: the kernels are then wrapped as custom_op does."""
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - torch 2.11 and 2.13 have them
        return False
    for fn in fns:
        set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    return True


def _kernel(fn):
    return fn


if not _never_traced(attention, _attention_autograd, attention_backward, _attention_backward_autograd,
                     _AttentionFunction.backward, _BackwardFunction.backward):  # pragma: no cover
    _kernel = torch._disable_dynamo  # noqa: F811
    _AttentionFunction.backward = staticmethod(_kernel(_AttentionFunction.backward))
    _BackwardFunction.backward = staticmethod(_kernel(_BackwardFunction.backward))
_LIB.impl("attention", _kernel(attention), "CompositeExplicitAutograd")
_LIB.impl("attention", _kernel(_attention_autograd), "Autograd", with_keyset=True)
_LIB.impl("attention_backward", _kernel(attention_backward), "CompositeExplicitAutograd")
_LIB.impl("attention_backward", _kernel(_attention_backward_autograd), "Autograd", with_keyset=True)
torch.library.register_fake("attnlang::attention", _attention_fake, lib=_LIB)
torch.library.register_fake("attnlang::attention_backward", _attention_backward_fake, lib=_LIB)


def call(variant, q, k, v, scale, backend, return_lse, kernel_options, tensors: Mapping[str, torch.Tensor]):
    """``variant(q, k, v, ...)`` as the custom op: what ``Variant.__call__`` runs while ``torch.compile`` traces.

    Dynamo traces only this function; the key is a trace-time constant and the op is one graph node."""
    names = tuple(sorted(tensors))
    key = call_key(variant._op_config, backend, scale, return_lse, kernel_options, names)
    named = [tensors[n] for n in names]
    out, lse = torch.ops.attnlang.attention(q, k, v, named, key, grad_bits(q, k, v, named))
    return (out, lse) if return_lse else out

