"""A variant's call as one PyTorch custom operator, so ``torch.compile`` sees one opaque node (and one for its
backward) instead of tracing attnlang's host code.

``torch.ops.attnlang.attention(q, k, v, tensors, key) -> (out, lse)``:
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
- the backward, ``torch.ops.attnlang.attention_backward``, recomputes the call under autograd through the
  backend's own differentiable path and takes ``torch.autograd.grad`` of it: one opaque node too. Gradients flow
  to q, k, v and to floating named tensors.

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


def _run(q, k, v, tensors, key, restore: bool = True):
    """The call ``key`` on these tensors; ``restore=False`` where the caller has restored the dispatch state."""
    variant, backend, scale, return_lse, options, names = spec_of(key)
    named = dict(zip(names, tensors))
    if not restore:
        return variant._eager_call(q, k, v, scale, backend, return_lse, options, named)
    with _dispatch_restored():
        return variant._eager_call(q, k, v, scale, backend, return_lse, options, named)


# Keys an op's implementation may find excluded and that the backends need: autograd (the backward's recompute)
# and functorch (flex builds its BlockMask with vmap).
_KEY_NAMES = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView",
              "FuncTorchDynamicLayerBackMode", "FuncTorchDynamicLayerFrontMode", "FuncTorchBatched",
              "FuncTorchVmapMode", "FuncTorchGradWrapper", "Batched", "BatchedNestedTensor", "VmapMode", "Conjugate",
              "Negative", "ZeroTensor")
_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in _KEY_NAMES if hasattr(torch._C.DispatchKey, name))


@contextlib.contextmanager
def _dispatch_restored():
    """The dispatcher's ordinary state inside a custom op's implementation. The op runs with the autograd keys
    excluded (``_AutoDispatchBelowAutograd``), and on a compiled graph's first run below a Python dispatch mode
    (AOTAutograd's custom-op aliasing check) with every key above Python excluded, which breaks the vmap in
    flex's BlockMask construction; the backward's recompute needs autograd. Restored on exit; the caller's
    dispatch modes are set aside meanwhile."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    keys = [key for key in _KEYS if excluded.has(key)]
    # what _disable_current_modes pops: the dispatch mode stack (infra modes included) and the pre-dispatch one
    modes = torch._C._len_torch_dispatch_stack() > 0 or torch._ops._len_torch_dispatch_stack_pre_dispatch() > 0
    if not keys and not modes:  # the common case (a compiled graph's later runs): ~9 us less per call
        yield
        return
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        if modes:
            stack.enter_context(torch.utils._python_dispatch._disable_current_modes())
        yield


def _bshd_like(out: torch.Tensor) -> torch.Tensor:
    """``out`` [B, H, S, D] with the strides the fake implementation promises (a [B, S, H, D] buffer)."""
    B, H, S, D = out.shape
    want = (S * H * D, D, H * D, 1)
    if out.stride() == want or out.numel() == 0:
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
    return [t.detach().requires_grad_(True) if wanted >> i & 1 else t.detach() for i, t in enumerate(inputs)]


class _Graphs:
    """The backend's own autograd graph of a forward call, kept from the op's forward until its backward, so the
    backward runs the backend's backward on what its forward saved: no second forward. Keyed by the memory of the
    op's output ``out`` (the backward gets another tensor object over the same memory); an entry goes with the
    ``out`` the forward returned (a forward whose backward never runs), so a live entry's memory is never reused."""

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}

    @staticmethod
    def _key(out: torch.Tensor) -> tuple:
        return (out.data_ptr(), str(out.device), out.dtype, tuple(out.shape), out.stride())

    def put(self, out: torch.Tensor, graph: tuple) -> None:
        key = self._key(out)
        self._entries[key] = (weakref.ref(out), graph)
        weakref.finalize(out, self._entries.pop, key, None)

    def take(self, out: torch.Tensor):
        key = self._key(out)
        hit = self._entries.get(key)
        if hit is None or hit[0]() is None:
            return None
        del self._entries[key]
        return hit[1]

    def __len__(self) -> int:
        return len(self._entries)


GRAPHS = _Graphs()


def _finish(q, o, l, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(l, torch.Tensor):
        l = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    out = _bshd_like(o.detach().to(q.dtype))
    if any(out.data_ptr() == t.data_ptr() for t in inputs if t.numel()):
        out = _bshd_like(out.clone())  # a custom op's outputs must not alias its inputs
    return out, l.detach().to(torch.float32).contiguous()


@torch.library.custom_op("attnlang::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor], key: str,
              wanted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Sq, Dv] (q's dtype, [B, Sq, Hq, Dv] strides), lse [B, Hq, Sq] float32 of the call ``key``.

    ``wanted`` (``grad_bits``): which inputs need gradients. With any, the backend runs under autograd (so it
    picks the kernel it picks for training, as outside compile) and its graph is kept for the backward."""
    inputs = (q, k, v, *tensors)
    if not wanted:
        with torch.no_grad():
            o, l = _run(q, k, v, tensors, key)
        return _finish(q, o, l, inputs)
    leaves = _leaves(inputs, wanted)
    with torch.enable_grad(), _dispatch_restored():
        o, l = _run(leaves[0], leaves[1], leaves[2], leaves[3:], key, restore=False)
    out, lse = _finish(q, o, l, inputs)
    GRAPHS.put(out, (o, l, leaves))
    return out, lse


@attention.register_fake
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


@torch.library.custom_op("attnlang::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor],
                       out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor,
                       key: str, wanted: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dq, dk, dv, [d tensor for each of ``tensors``]) of the call ``key``; ``wanted``: bit i set when input i
    (q, k, v, then tensors) needs a gradient (others come back as zeros, named ones of size 0).

    Runs the backend's backward on the graph its forward kept (``GRAPHS``); where none was kept (a second
    backward through the same graph, a forward recomputed by activation checkpointing) the forward is recomputed
    under autograd first."""
    inputs = [q, k, v, *tensors]
    needing = [i for i in range(len(inputs)) if wanted >> i & 1]
    grads: list = [None] * len(inputs)
    return_lse = spec_of(key)[3]
    if needing:
        with torch.enable_grad(), _dispatch_restored():  # autograd.grad too: the eager backend checkpoints
            graph = GRAPHS.take(out)
            if graph is None:
                leaves = _leaves(inputs, wanted)
                o, l = _run(leaves[0], leaves[1], leaves[2], leaves[3:], key, restore=False)
            else:
                o, l, leaves = graph
            outs, gouts = [o], [grad_out.to(o.dtype)]
            # lse's gradient only where the caller sees lse: otherwise it is zero
            if return_lse and isinstance(l, torch.Tensor) and l.requires_grad:
                outs.append(l)
                gouts.append(grad_lse.to(l.dtype))
            got = torch.autograd.grad(outs, [leaves[i] for i in needing], gouts, allow_unused=True)
        for i, g in zip(needing, got):
            grads[i] = g
    result = []
    for i, t in enumerate(inputs):
        g = grads[i]
        if g is None:
            g = torch.zeros_like(t) if i < 3 or wanted >> i & 1 else t.new_zeros((0,))
        result.append(g.to(t.dtype).contiguous())
    return result[0], result[1], result[2], result[3:]


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, tensors, out, lse, grad_out, grad_lse, key, wanted):
    named = [torch.empty_like(t, memory_format=torch.contiguous_format) if wanted >> (3 + i) & 1
             else t.new_empty((0,)) for i, t in enumerate(tensors)]
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), named)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, key, wanted = inputs
    out, lse = output
    ctx.key, ctx.wanted = key, wanted
    ctx.save_for_backward(q, k, v, out, lse, *tensors)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dq, dk, dv, dnamed = attention_backward(q, k, v, list(tensors), out, lse, grad_out, grad_lse, ctx.key,
                                            ctx.wanted)
    named = [g if ctx.wanted >> (3 + i) & 1 else None for i, g in enumerate(dnamed)]
    return dq, dk, dv, named, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def call(variant, q, k, v, scale, backend, return_lse, kernel_options, tensors: Mapping[str, torch.Tensor]):
    """``variant(q, k, v, ...)`` as the custom op: what ``Variant.__call__`` runs while ``torch.compile`` traces.

    Dynamo traces only this function; the key is a trace-time constant and the op is one graph node."""
    names = tuple(sorted(tensors))
    key = call_key(variant._op_config, backend, scale, return_lse, kernel_options, names)
    named = [tensors[n] for n in names]
    out, lse = torch.ops.attnlang.attention(q, k, v, named, key, grad_bits(q, k, v, named))
    return (out, lse) if return_lse else out

