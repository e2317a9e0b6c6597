"""FA4's host calls (``_flash_attn_fwd``, ``_flash_attn_bwd``) replayed as the allocations and kernel launches they
made, without FA4's Python between them (issue 18: the compiled prefill and training step were host-bound on it;
benchmarks/results/s7: one warm _flash_attn_fwd cost ~100 us of host for a launch of a tenth of that).

A ``Replay`` belongs to one call signature (what its caller keys it on, ``replayed``: the plan, every tensor's
shape, strides, dtype, device and alignment, the arguments). Its calls, in turn:
1. warm: FA4 itself (a signature's first call may compile kernels, which is not recorded);
2. record: FA4 itself, recorded (``record``):
   - every ATen op FA4 makes, under a TorchDispatchMode: allocations (empty, empty_strided, zeros, empty_like,
     zeros_like, new_empty, new_zeros, full), views (detach, transpose, view, as_strided, slice, select, permute,
     ...) and zero / fill of a fresh buffer no kernel has read yet are kept; any other op (a computation, a copy,
     a write to an input) means the call is not a plain sequence of launches: the signature stays on FA4's call;
   - every compiled kernel call, through each ``compile_cache`` of flash_attn.cute's interface (wrapped for the
     call), with its arguments: each tensor argument must be an input's view, a buffer the call allocated (zeroed
     or not, as it was when the first kernel read it) or one of the caller's per-plan constant tensors (aux
     tensors, block-sparse tables, cu_seqlens); anything else (a tensor from elsewhere) rejects the signature;
3. check: FA4 again, and beside it the recorded program into its own buffers (a fresh buffer also in place of an
   input the call writes its result into, FA4's ``out=``); the two are compared on the device, bit for bit where
   the kernels are deterministic, within 1% of the largest value where they accumulate with atomics (FA4's
   backward dq); the comparison comes back through pinned memory without a sync. A program that raises, or whose
   results differ, leaves the signature on FA4's own call for good;
4. pending: FA4 itself until the comparison has arrived (``torch.cuda.Event.query``);
5. replay: the program alone: the same kernels, with the same arguments, in the same order, on the current stream.
While a CUDA graph is captured a Replay records and checks nothing (it replays only if already replaying).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.zeros.default, aten.empty_like.default,
                aten.zeros_like.default, aten.new_empty.default, aten.new_zeros.default,
                aten.new_empty_strided.default, aten.full.default}
_ZERO_ALLOCATIONS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
_VIEWS = {aten.detach.default, aten.transpose.int, aten.view.default, aten._unsafe_view.default,
          aten.as_strided.default, aten.slice.Tensor, aten.select.int, aten.permute.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.alias.default, aten.t.default,
          aten.unflatten.int, aten.flatten.using_ints, aten.reshape.default, aten.lift_fresh.default}
_FILLS = {aten.zero_.default, aten.fill_.Scalar}

_LOCK = threading.Lock()  # recording swaps module-wide compile caches


class Rejected(Exception):
    """The recorded call is not a plain sequence of allocations and launches (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class _Input:
    index: int  # which input of the call
    size: tuple
    stride: tuple
    offset: int  # storage offset relative to the input's own
    whole: bool = False  # the input itself (its own shape and strides): the signature's key fixes both


@dataclasses.dataclass(frozen=True)
class _Buffer:
    index: int  # which of the program's buffers
    size: tuple
    stride: tuple
    offset: int


@dataclasses.dataclass(frozen=True)
class _Const:
    value: Any


@dataclasses.dataclass(frozen=True)
class _Rebuilt:
    """A tuple / list / NamedTuple argument holding tensors: rebuilt from its parts on every call."""
    kind: type
    parts: tuple


@dataclasses.dataclass(frozen=True)
class _Storage:
    numel: int
    dtype: torch.dtype
    fill: float | None  # None: left uninitialised (torch.empty), else the value the buffer starts with


@dataclasses.dataclass(frozen=True)
class Program:
    """What one FA4 host call did: buffers to allocate, kernels to call (each a compiled function and its argument
    templates), and the templates of what it returned."""
    storages: tuple[_Storage, ...]
    launches: tuple[tuple[Callable, tuple], ...]
    result: Any
    written: frozenset = frozenset()  # inputs the results are written into (FA4's out= argument)

    def __post_init__(self):
        # per launch: the argument list with its constants in place, and the positions to fill on every call
        steps = []
        for fn, args in self.launches:
            fixed = [a.value if type(a) is _Const else None for a in args]
            steps.append((fn, fixed, tuple((i, a) for i, a in enumerate(args) if type(a) is not _Const)))
        object.__setattr__(self, "_steps", tuple(steps))

    def run(self, inputs: Sequence[torch.Tensor | None], device: torch.device):
        buffers = [torch.empty(s.numel, dtype=s.dtype, device=device) if s.fill is None else
                   torch.full((s.numel,), s.fill, dtype=s.dtype, device=device) for s in self.storages]
        for fn, fixed, dynamic in self._steps:
            args = fixed.copy()
            for i, a in dynamic:
                args[i] = _build(a, inputs, buffers)
            fn(*args)
        return _build(self.result, inputs, buffers)


def _build(template, inputs, buffers):
    kind = type(template)
    if kind is _Const:
        return template.value
    if kind is _Input:
        t = inputs[template.index]
        if template.whole:
            return t.detach() if t.requires_grad else t
        return t.detach().as_strided(template.size, template.stride, t.storage_offset() + template.offset)
    if kind is _Buffer:
        return buffers[template.index].as_strided(template.size, template.stride, template.offset)
    parts = [_build(p, inputs, buffers) for p in template.parts]
    return template.kind._make(parts) if hasattr(template.kind, "_make") else template.kind(parts)


class _Log(TorchDispatchMode):
    """The ATen ops of one FA4 host call: fresh buffers (by storage), their fills, and a rejection reason."""

    def __init__(self, input_storages: set[int]):
        super().__init__()
        self.inputs = input_storages
        self.storages: dict[int, list] = {}  # storage data_ptr -> [numel, dtype, fill, used]
        self.in_kernel = 0
        self.why: str | None = None

    def touch(self, value) -> None:
        """A kernel reads ``value``'s buffers: a later fill of one of them is no fresh buffer's fill."""
        for t in _tensors(value):
            entry = self.storages.get(t.untyped_storage().data_ptr())
            if entry is not None:
                entry[3] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_kernel or self.why is not None:
            return out
        if func in _ALLOCATIONS:
            old = self.storages.get(out.untyped_storage().data_ptr())
            if old is not None and old[3]:
                self.why = "a buffer's address was reused within the call"
            if func in (aten.full.default,):
                fill = float(args[1])
            else:
                fill = 0.0 if func in _ZERO_ALLOCATIONS else None
            self.storages[out.untyped_storage().data_ptr()] = [out.untyped_storage().nbytes() // out.element_size(),
                                                               out.dtype, fill, False]
        elif func in _FILLS:
            entry = self.storages.get(args[0].untyped_storage().data_ptr())
            whole = args[0].numel() * args[0].element_size() == args[0].untyped_storage().nbytes()
            if entry is None or entry[3] or not whole:
                self.why = f"{func} on a tensor that is not a fresh, unused buffer"
            else:
                entry[2] = 0.0 if func is aten.zero_.default else float(args[1])
        elif func not in _VIEWS:
            self.why = f"FA4 ran {func} on the host's side of its kernels"
        return out


def _template(value, log: _Log, inputs, constants: dict[int, Any], order: dict[int, int]):
    """The template of one kernel argument (or returned value)."""
    if isinstance(value, torch.Tensor):
        ptr = value.untyped_storage().data_ptr() if value.numel() or value.untyped_storage().nbytes() else None
        if id(value) in constants or any(value is c for c in constants.values()):
            return _Const(value)
        for i, t in enumerate(inputs):
            if t is not None and ptr is not None and t.untyped_storage().data_ptr() == ptr:
                offset = value.storage_offset() - t.storage_offset()
                whole = offset == 0 and value.shape == t.shape and value.stride() == t.stride()
                return _Input(i, tuple(value.shape), tuple(value.stride()), offset, whole)
        entry = log.storages.get(ptr)
        if entry is None:
            for c in constants.values():  # a view of a constant (the plan's aux tensor, as FA4 passes it on)
                if isinstance(c, torch.Tensor) and c.untyped_storage().data_ptr() == ptr:
                    return _Const(value)
            raise Rejected(f"a kernel reads a tensor of shape {tuple(value.shape)} the call did not allocate")
        index = order.setdefault(ptr, len(order))
        return _Buffer(index, tuple(value.shape), tuple(value.stride()), value.storage_offset())
    if isinstance(value, (tuple, list)):
        parts = tuple(_template(v, log, inputs, constants, order) for v in value)
        if all(type(p) is _Const for p in parts):
            return _Const(value)
        return _Rebuilt(type(value), parts)
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype)) or not _holds_tensors(value):
        return _Const(value)
    raise Rejected(f"a kernel argument of type {type(value).__name__} holds tensors")


def _holds_tensors(value) -> bool:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(isinstance(getattr(value, f.name), torch.Tensor) for f in dataclasses.fields(value))
    return any(isinstance(v, torch.Tensor) for v in getattr(value, "__dict__", {}).values())


def _caches(modules) -> list:
    """Every function of ``modules`` with a ``compile_cache``: where flash_attn.cute keeps its compiled kernels."""
    found = []
    for module in modules:
        for name in dir(module):
            fn = getattr(module, name, None)
            if callable(fn) and hasattr(fn, "compile_cache") and fn not in found:
                found.append(fn)
    return found


class _Recording:
    """A compile cache's stand-in while one call is recorded: lookups go to the real cache, calls are logged."""

    def __init__(self, real, calls: list, log: _Log):
        self.real, self.calls, self.log = real, calls, log

    def __contains__(self, key):
        return key in self.real

    def __setitem__(self, key, fn):
        self.real[key] = fn

    def __getitem__(self, key):
        fn = self.real[key]

        def launch(*args):
            self.calls.append((fn, args))
            self.log.touch(args)
            self.log.in_kernel += 1
            try:
                return fn(*args)
            finally:
                self.log.in_kernel -= 1
        return launch

    def __getattr__(self, name):
        return getattr(self.real, name)


def record(call: Callable[[], Any], inputs: Sequence[torch.Tensor | None], constants: Sequence[Any],
           modules: Sequence[Any]) -> tuple[Any, Program | None, str | None]:
    """Run ``call()`` (an FA4 host call on ``inputs``) and record it: (its result, the Program or None, why not)."""
    input_storages = [t.untyped_storage().data_ptr() for t in inputs if t is not None]
    if len(set(input_storages)) != len(input_storages):
        return call(), None, "two inputs share one storage"
    log = _Log(set(input_storages))
    calls: list = []
    with _LOCK:
        owners = _caches(modules)
        real = [fn.compile_cache for fn in owners]
        for fn, cache in zip(owners, real):
            fn.compile_cache = _Recording(cache, calls, log)
        try:
            with log:
                result = call()
        finally:
            for fn, cache in zip(owners, real):
                fn.compile_cache = cache
    if log.why is not None:
        return result, None, log.why
    if not calls:
        return result, None, "no kernel launch was seen"
    const = {id(c): c for c in _flatten(constants)}
    order: dict[int, int] = {}
    try:
        launches = tuple((fn, tuple(_template(a, log, inputs, const, order) for a in args)) for fn, args in calls)
        returned = _template(result, log, inputs, const, order)
    except Rejected as e:
        return result, None, str(e)
    # inputs the call writes its results into (out=): the check runs the program on fresh buffers in their place
    written = frozenset(t.index for t in _parts(returned) if type(t) is _Input)
    by_index = sorted(order.items(), key=lambda item: item[1])
    storages = tuple(_Storage(log.storages[ptr][0], log.storages[ptr][1], log.storages[ptr][2]) for ptr, _ in by_index)
    return result, Program(storages, launches, returned, written), None


def _parts(template) -> list:
    if type(template) is _Rebuilt:
        return [p for part in template.parts for p in _parts(part)]
    return [template]


def _flatten(values) -> list:
    out = []
    for v in values:
        if isinstance(v, (tuple, list)):
            out.extend(_flatten(v))
        elif v is not None:
            out.append(v)
    return out


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _mismatch(a: list, b: list, exact: bool) -> torch.Tensor:
    """A device bool: whether the program's results ``b`` differ from FA4's ``a``."""
    device = a[0].device if a else torch.device("cpu")
    bad = torch.tensor(len(a) != len(b), device=device)
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return torch.ones((), dtype=torch.bool, device=device)
        if exact:
            bad = bad | ((x != y) & ~(x.isnan() & y.isnan())).any()
        else:  # atomics: summation order differs between runs, a few ulps of the accumulated fp32 after rounding
            xf, yf = x.float(), y.float()
            tol = 1e-2 * xf.abs().amax().nan_to_num(0.0) + 1e-6
            bad = bad | ((xf - yf).abs() > tol).any() | (xf.isnan() != yf.isnan()).any()
    return bad


def replayed(memo: dict, key: tuple | None, exact: bool, call: Callable[[], Any],
             inputs: Sequence[torch.Tensor | None], constants: Sequence[Any], modules: Sequence[Any]):
    """``call()`` (an FA4 host call on ``inputs``), through the Replay kept in ``memo`` under ``key`` plus the
    inputs' strides and alignment; ``call()`` itself where ``key`` is None. ``key`` must hold everything the call
    depends on but ``inputs`` and ``constants`` (the caller's per-plan tensors among FA4's arguments: a replay
    keeps the ones it recorded, so they must be the same values for as long as ``memo`` lives)."""
    if key is None:
        return call()
    key = key + tuple((t.stride(), t.data_ptr() % 16) if t is not None else None for t in inputs)
    replay = memo.get(key)
    if replay is None:
        replay = memo[key] = Replay(exact)
    return replay(call, inputs, constants, modules)


_ALL: "weakref.WeakSet[Replay]" = weakref.WeakSet()


def states() -> list[tuple[str, str, str | None]]:
    """(kind, state, why) of every live Replay: kind "exact" (forward) or "tolerance" (backward); state "warm",
    "record", "check", "pending", "replay" or "own"; why: the reason a signature stays on FA4's own call."""
    return [("exact" if r.exact else "tolerance", r.state, r.why) for r in list(_ALL)]


class Replay:
    """One call signature's way to FA4: its own call until a recorded program has been checked against it."""

    def __init__(self, exact: bool):
        _ALL.add(self)
        self.exact = exact
        self.program: Program | None = None
        # warm (the first call may compile kernels: not recorded) -> record -> check -> pending -> replay | own
        self.state = "warm"
        self.why: str | None = None
        self._flag = None
        self._event = None

    def __call__(self, call: Callable[[], Any], inputs: Sequence[torch.Tensor | None], constants: Sequence[Any],
                 modules: Sequence[Any]):
        if self.state == "replay":
            return self.program.run(inputs, inputs[0].device)
        if inputs[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return call()  # no recording, no check (its event and pinned copy) inside a CUDA graph
        if self.state == "pending":
            if not self._event.query():
                return call()  # the check's result has not arrived: FA4's own call meanwhile
            self.state = "own" if bool(self._flag) else "replay"
            if self.state == "own":
                self.why = "the recorded launches gave other results than FA4's call"
            self._flag = self._event = None
            return call() if self.state == "own" else self.program.run(inputs, inputs[0].device)
        if self.state == "own":
            return call()
        if self.state == "warm":
            self.state = "record"
            return call()
        if self.state == "record":
            result, self.program, self.why = record(call, inputs, constants, modules)
            self.state = "check" if self.program is not None else "own"
            return result
        result = call()  # check: FA4's own result goes to the caller, the program's beside it
        # an input the call writes into gets a fresh buffer for the program (else both results were one tensor)
        beside = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                  if i in self.program.written else t for i, t in enumerate(inputs)]
        try:
            mine = self.program.run(beside, inputs[0].device)
        except Exception as e:  # e.g. a launch refusing an argument: the signature keeps FA4's own call
            self.state, self.why, self.program = "own", f"the recorded launches failed: {type(e).__name__}: {e}", None
            return result
        bad = _mismatch(_tensors(result), _tensors(mine), self.exact)
        if not bad.is_cuda:  # a CPU stand-in for FA4 (tests): nothing to wait for
            self.state = "own" if bool(bad) else "replay"
            self.why = "the recorded launches gave other results than FA4's call" if self.state == "own" else None
            return result
        self._flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._flag.copy_(bad, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self.state = "pending"
        return result
