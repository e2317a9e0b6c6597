"""Variant: a compiled attention variant, and the call-time checks that stand before every backend."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import numbers
import sys
from collections import OrderedDict
from typing import Any, Mapping

import torch

from . import op as _op
from .ast import DType, Index, names_used, walk
from .check import Checked, bind, check, check_float_range, check_index_bounds, check_named_tensor, dtype_of_torch
from .denominator import finish, lse_float32
from .errors import AttnLangError
from .intervals import Interval, bounds, tensor_range
from .memo import MEMO, IdentityMemo
from .parse import MAX_LENGTH, parse
from .plan import CallPlan, WeakTensors
from .printer import to_source
from .simplify import Simplified, simplify_variant

__all__ = ["Variant", "compile", "from_config", "reference", "BACKENDS"]

BACKENDS = ("auto", "eager", "flex", "fa4")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Required:
    """The default of q / k / v (and reference's variant): left out, it is an AttnLangError saying so, not Python's
    TypeError; shown as <required> in signatures."""

    def __repr__(self) -> str:
        return "<required>"


_MISSING = _Required()


class _Default:
    """The default of an option of explain() / block_sparsity() left out (its value is in the docstring)."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT = _Default()
# packages whose code tests a Variant (a callable) for presence with bool(): they get True (see __bool__)
_TRUTHY_CALLERS = frozenset({"torch", "functools", "inspect", "transformers", "typing", "dataclasses"})
CONFIG_KEYS = ("score", "mask", "params", "sink", "normalize")


class Variant:
    """An attention variant: a score expression and a mask expression (and optionally a sink expression and
    ``normalize=False``, LANGUAGE.md), checked and simplified.

    Immutable and hashable; two variants are equal when their canonical (simplified) forms are equal.
    Build one with ``attnlang.compile``. Call it like attention: ``out = v(q, k, v_, **tensors)``.
    """

    __slots__ = ("_score_source", "_mask_source", "_params", "_checked", "_simplified", "_key", "_bind_cache",
                 "_sink_source", "_normalize", "_op_config", "_warm", "__weakref__")

    def __init__(self, score: str = "score", mask: str = "True", params: Mapping[str, Any] | None = None,
                 sink: str | None = None, normalize: bool = True):
        params = _plain_params(params)
        _check_denominator_args(sink, normalize)
        checked = check(score, mask, params, sink)
        simplified = simplify_variant(checked.score, checked.mask, checked.sink, normalize)
        object.__setattr__(self, "_score_source", score)
        object.__setattr__(self, "_mask_source", mask)
        object.__setattr__(self, "_sink_source", sink)
        object.__setattr__(self, "_normalize", normalize)
        object.__setattr__(self, "_params", dict(params or {}))
        object.__setattr__(self, "_checked", checked)
        object.__setattr__(self, "_simplified", simplified)
        shift = "" if simplified.lse_shift is None else to_source(simplified.lse_shift)
        key = (to_source(simplified.score), to_source(simplified.mask), shift)
        # the two optional parts extend the key only when set, so existing variants keep their key
        if simplified.sink is not None:
            key += (f"sink: {to_source(simplified.sink)}",)
        if not normalize:
            key += ("normalize: False",)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_bind_cache", {})
        object.__setattr__(self, "_warm", OrderedDict())  # call key -> CallPlan of the last calls (_warm_plan)
        # a string naming this variant for its custom op's key (attnlang.op), read while Dynamo traces a call
        object.__setattr__(self, "_op_config", _op.register(self, self.to_config()))

    def __setattr__(self, name, value):
        raise AttributeError("Variant is immutable")

    def __delattr__(self, name):
        raise AttributeError("Variant is immutable")

    # ----- identity -----
    @property
    def score(self) -> str:
        """The score expression as written."""
        return self._score_source

    @property
    def mask(self) -> str:
        """The mask expression as written."""
        return self._mask_source

    @property
    def sink(self) -> str | None:
        """The sink expression as written (None without one)."""
        return self._sink_source

    @property
    def normalize(self) -> bool:
        """False when out is the softmax's numerator alone (LANGUAGE.md)."""
        return self._normalize

    @property
    def params(self) -> dict:
        """The compile-time scalar parameters (a copy)."""
        return dict(self._params)

    @property
    def checked(self) -> Checked:
        """The checked, typed expressions before simplification."""
        return self._checked

    @property
    def simplified(self) -> Simplified:
        """The simplified expressions, the lse correction and the trace of rules that fired."""
        return self._simplified

    @property
    def canonical(self) -> tuple[str, ...]:
        """(score, mask, lse shift) in canonical text, then "sink: ..." and "normalize: False" when set: what
        equality and hashing use."""
        return self._key

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Names of the tensors a call must bind, sorted."""
        return tuple(sorted(self._checked.tensors))

    def __eq__(self, other) -> bool:
        return isinstance(other, Variant) and self._key == other._key

    def __hash__(self) -> int:
        return hash(("attnlang.Variant",) + self._key)

    def __repr__(self) -> str:
        parts = [f"score={self._score_source!r}", f"mask={self._mask_source!r}"]
        if self._params:
            parts.append(f"params={self._params!r}")
        if self._sink_source is not None:
            parts.append(f"sink={self._sink_source!r}")
        if not self._normalize:
            parts.append("normalize=False")
        return f"Variant({', '.join(parts)})"

    def __reduce__(self):
        return (Variant, (self._score_source, self._mask_source, self._params, self._sink_source, self._normalize))

    # ----- composition (attnlang.compose): masks combined, parameters merged -----
    def __and__(self, other: "Variant") -> "Variant":
        """The variant whose mask is both masks' and; both scores must be ``score``; params merge."""
        return _compose("and", self, other)

    def __or__(self, other: "Variant") -> "Variant":
        """The variant whose mask is either mask; both scores must be ``score``; params merge."""
        return _compose("or", self, other)

    def __invert__(self) -> "Variant":
        """The variant whose mask is this mask's not; the score must be ``score``."""
        return _compose("not", self)

    def __rand__(self, other):  # ``1 & v``: the same error as ``v & 1``
        return _compose("and", other, self)

    def __ror__(self, other):
        return _compose("or", other, self)

    def __xor__(self, other):
        raise AttnLangError("'^' does not compose variants; write (a & ~b) | (~a & b) for the masks' exclusive or")

    __rxor__ = __xor__

    def __bool__(self):
        # ``a and b`` would silently be b, ``not a`` False: the words never compose variants (JAX Splash masks too).
        # Libraries that test a callable for presence (Dynamo's ``if fn and callable(fn)`` on torch 2.11, functools,
        # transformers) get True: only the caller's own ``and`` / ``or`` / ``not`` / ``if variant`` is an error.
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.split(".", 1)[0] in _TRUTHY_CALLERS:
            return True
        raise AttnLangError("a Variant has no truth value: compose variants with &, | and ~ (not 'and', 'or', "
                            "'not'), and test for a missing one with 'is None'")

    # ----- configs -----
    def to_config(self) -> dict:
        """A JSON-serialisable dict {"score", "mask", "params"} (plus "sink" and "normalize" when set);
        ``attnlang.from_config(d) == self``."""
        config = {"score": self._score_source, "mask": self._mask_source, "params": dict(self._params)}
        if self._sink_source is not None:
            config["sink"] = self._sink_source
        if not self._normalize:
            config["normalize"] = False
        return config

    # ----- explain -----
    def explain(self, q_len: int | None = _DEFAULT, kv_len: int | None = _DEFAULT,
                block_size: tuple[int, int] | int = _DEFAULT, /, **tensors) -> str:
        """A human-readable report: parsed and simplified forms, types, tensors, rules that fired; with lengths,
        the mask's block sparsity in ``block_size`` blocks (default 128 x 128; from the values of ``tensors``,
        bound by name, for a mask that reads tensors). ``block_size=`` is that option unless the variant reads a
        tensor named ``block_size`` (LANGUAGE.md reserves only the call's keywords): then the keyword binds the
        tensor, and the option is given by position. Raises AttnLangError for bad lengths, block sizes or tensors."""
        from .explain import explain
        q_len, kv_len, block_size = self._options(
            "explain", {"q_len": q_len, "kv_len": kv_len, "block_size": block_size}, tensors,
            {"q_len": None, "kv_len": None, "block_size": (128, 128)})
        return explain(self._score_source, self._mask_source, self._params, self._checked, self._simplified,
                       q_len=q_len, kv_len=kv_len, normalize=self._normalize, tensors=tensors,
                       block_size=block_size)

    def block_sparsity(self, q_len: int = _MISSING, kv_len: int = _MISSING, batch: int = _DEFAULT,
                       heads: int = _DEFAULT, block_size: tuple[int, int] | int = _DEFAULT, /, **tensors):
        """Classify every (query block, key block) tile as empty / partial / full; see attnlang.sparsity.

        ``q_len``, ``kv_len`` (required), ``batch``, ``heads`` (default 1) and ``block_size`` (default 128 x 128) by
        position or keyword; ``device=`` (where ``kind`` lives) and ``refine=`` are the options of
        attnlang.sparsity.block_sparsity. A keyword among batch, heads, block_size, device and refine that names a
        tensor the variant reads binds that tensor (LANGUAGE.md reserves only the call's own keywords); such an
        option is then given by position (or left at its default).
        """
        from .sparsity import mask_block_sparsity
        q_len, kv_len, batch, heads, block_size = self._options(
            "block_sparsity", {"q_len": q_len, "kv_len": kv_len, "batch": batch, "heads": heads,
                               "block_size": block_size}, tensors,
            {"batch": 1, "heads": 1, "block_size": (128, 128)})
        options = {name: tensors.pop(name) for name in ("device", "refine")
                   if name in tensors and name not in self._checked.tensors}
        return mask_block_sparsity(self._simplified.mask, self._checked.tensors, self._checked.sources, q_len,
                                   kv_len, batch, heads, block_size, tensors, **options)

    def _options(self, what: str, given: dict, tensors: dict, defaults: dict) -> list:
        """The values of ``what``'s options: each given by position (``given``; _MISSING or _DEFAULT if not), else
        by keyword (popped from ``tensors``) unless the variant reads a tensor of that name, else its default (an
        option without one is required)."""
        out = []
        for name, value in given.items():
            by_keyword = name in tensors and name not in self._checked.tensors
            unset = value is _MISSING or value is _DEFAULT
            if by_keyword and not unset:
                raise AttnLangError(f"{what}() got {name} both by position and by keyword")
            if by_keyword:
                value, unset = tensors.pop(name), False
            if unset:
                if name not in defaults:
                    raise AttnLangError(f"{what}() needs {name}")
                value = defaults[name]
            out.append(value)
        return out

    # ----- calling -----
    def __call__(self, q: torch.Tensor = _MISSING, k: torch.Tensor = _MISSING, v: torch.Tensor = _MISSING, /, *extra,
                 scale: float | None = None,
                 backend: str = "auto", return_lse: bool = False, kernel_options: Mapping | None = None,
                 **tensors: torch.Tensor):
        """Attention with this variant.

        Args:
            q: [B, Hq, Sq, D]; k: [B, Hkv, Skv, D]; v: [B, Hkv, Skv, Dv]. One floating dtype (float16, bfloat16,
                float32, float64), one device; Hq a multiple of Hkv (grouped-query attention). Any size but D may
                be 0 (Hkv only with Hq): see "Empty inputs" below.
            scale: multiplies q·k before the score expression; default 1/sqrt(D).
            backend: "auto" (default), "eager", "flex" or "fa4".
            return_lse: also return lse, [B, Hq, Sq], natural log (-inf for rows with no allowed key; the sink's
                value there when the variant has a sink), float32, float64 when q is float64.
            kernel_options: backend options (e.g. {"BACKEND": "TRITON"} for flex).
            **tensors: every tensor the expressions read, by name.
        Returns:
            out [B, Hq, Sq, Dv] in q's dtype, or (out, lse) with return_lse.
        Raises:
            AttnLangError: bad shapes, dtypes or devices (a head dim D of 0 too, or Hkv of 0 with Hq > 0); q, k
                and v not all given by position; missing, extra or mis-shaped tensors; an index that can
                fall outside its tensor; a backend that cannot run this variant here; int() of inf or NaN, or an
                int that overflows int64; a float literal, param or tensor value past the compute dtype's range
                (float32's 3.4e38 for float32 / 16-bit inputs; float64 for float64); a float64 lse past
                float32's (lse is float32); a NaN or +inf score at an allowed position.

        NaN, on every backend: comparisons with NaN are False as in IEEE (``!=`` is True), NaN propagates
        through arithmetic, functions and min / max / clamp (``sign(NaN)`` is 0, as torch gives), and a mask
        that is False masks its position: ``sqrt(-1.0) > 0.0`` masks every key, silently. A score that is NaN
        at an allowed position is an error; at a masked position it is never seen. A NaN or inf in q or k is a
        NaN / inf score (an error where allowed; -inf scores are masked). A NaN or inf in v is not checked (that
        would cost a device sync per call): the rows it meets are NaN / inf, and since a weight of 0 times NaN or
        inf is NaN, which rows that is beyond those attending the key depends on the backend's tiling (eager's
        matmul meets every key; fa4 and flex skip empty blocks); rows with no allowed key stay 0. With
        normalize=False, whose numerator is checked anyway, it is an AttnLangError naming the row.

        Empty inputs, on every backend (fa4 without a GPU and flex with gradients on the CPU included: no kernel
        runs, the result is built before any backend is asked; kernel_options are still checked): with B, Hq or Sq
        of 0, out [B, Hq, Sq, Dv] and lse [B, Hq, Sq] hold no element, as torch's scaled_dot_product_attention
        gives. With Skv of 0 (and Sq > 0) no row has an allowed key: out is 0 and lse -inf, or the sink's value
        with a sink (LANGUAGE.md), exactly as the eager backend gives a row whose mask is all False. Gradients are
        zeros for q, k, v and the named tensors (``out.sum().backward()`` works), plus what flows through the
        sink. Named tensors are checked as usual, except the reads at positions that do not exist: with B = 0 a
        ``doc`` of shape [0, S] read as ``doc[b, q_idx]`` is fine, while ``bias[h, 5]`` of a bias of size 3 is an
        error at any size; the same holds inside torch.compile.

        Float values (literals, params, float named tensors of any float dtype) are computed in the compute dtype:
        float64 for float64 inputs, else float32. A value past its range is an error (above); a tiny one rounds
        there as float32 does (a float64 tensor's 1e-300 is 0.0 in float32, so ``t[h] > 0.0`` is False for it).
        """
        if extra or v is _MISSING:
            raise AttnLangError(self._positional_message(3 + len(extra) if extra else
                                                         sum(t is not _MISSING for t in (q, k, v)), tensors))
        if torch.compiler.is_compiling():
            # under torch.compile the call is one custom op (attnlang.op): Dynamo never traces what follows
            return _op.call(self, q, k, v, scale, backend, return_lse, kernel_options, tensors)
        out, lse = self._eager_call(q, k, v, scale, backend, return_lse, kernel_options, tensors)
        return (out, lse) if return_lse else out

    def _positional_message(self, given: int, tensors) -> str:
        names = ", ".join(f"{n}=<tensor>" for n in self.tensor_names) or "none"
        msg = (f"a variant takes three positional arguments (q, k, v), got {given}; named tensors are passed by "
               f"name (this variant reads: {names})")
        by_name = [n for n in ("q", "k", "v") if n in tensors and n not in self.tensor_names]
        if given < 3 and by_name:
            were = "was" if len(by_name) == 1 else "were"
            msg += f"; {', '.join(by_name)} {were} given by name: pass q, k, v by position"
        return msg

    def _eager_call(self, q, k, v, scale, backend, return_lse, kernel_options, tensors):
        """(out, lse) of one call, checks included: the call outside torch.compile, and the custom op's body."""
        plan = self._warm_plan(q, k, v, scale, backend, return_lse, kernel_options, tensors)
        if not (plan.batch and plan.q_heads and plan.q_len and plan.kv_len):
            return _empty_call(q, k, v, plan, backend, tensors)
        from .backends import run
        out, lse = run(backend, q, k, v, plan)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
            out, lse = _connect_unread(out, lse, plan, tensors)
        return out, lse

    def _warm_plan(self, q, k, v, scale, backend, return_lse, kernel_options, tensors) -> CallPlan:
        """A recent call's CallPlan again when this call has the same key (below), else a new one from _plan
        (the last ``_WARM_PLANS`` kept: a training step alternates a layer's calls with and without gradients, a
        test its fa4 calls with eager ones).

        A warm call spends its host time in front of the kernel: on the H200, the checks and the plan were ~50 of
        the ~100 us attnlang added to a 215 us FA4 kernel (sinks_window), enough to leave the GPU waiting. The
        plan reads only what the key holds: q / k / v shapes, dtypes, device and requires_grad; the named tensors'
        shapes, dtypes, requires_grad and values (``MEMO.token``: the same live tensor, unmodified: a new token
        after any in-place write, and none kept for inference tensors on CUDA); scale, backend, return_lse,
        kernel_options (hashable ones only) and the grad mode. Backends keep per-plan results in ``plan.memo``,
        so they are reused exactly as long as the plan is."""
        key = _call_key(q, k, v, scale, backend, return_lse, kernel_options, tensors)
        if key is None:
            return self._plan(q, k, v, scale, backend, return_lse, kernel_options, tensors)
        warm = self._warm
        plan = warm.get(key)
        if plan is not None:
            if next(reversed(warm)) != key:
                warm.move_to_end(key)
            return plan
        plan = self._plan(q, k, v, scale, backend, return_lse, kernel_options, tensors)
        if plan.tensors:
            # kept for reuse, the plan must not keep the call's named tensors alive (a warm call passes them again)
            plan = dataclasses.replace(plan, tensors=WeakTensors(plan.tensors))
        # plans whose tensors were freed can never be hit again; their memos may hold what backends derived from
        # those tensors (fa4's kernel arguments hold its aux tensors, often the named tensor itself): drop them
        dead = [k_ for k_, p in warm.items() if isinstance(p.tensors, WeakTensors) and not p.tensors.alive()]
        for k_ in dead:
            del warm[k_]
        warm[key] = plan
        if len(warm) > _WARM_PLANS:
            warm.popitem(last=False)
        return plan

    def _static_checks(self, q, k, v, scale, backend, return_lse, kernel_options, tensors):
        """The call's checks that read no tensor values (shapes, dtypes, devices, names, the expressions' typing):
        they also run on FakeTensors while torch.compile traces. Returns (scale, dtypes of the named tensors)."""
        _check_qkv(q, k, v)
        if backend not in BACKENDS:
            raise AttnLangError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if not isinstance(return_lse, bool):
            raise AttnLangError(f"return_lse must be True or False, got {return_lse!r}")
        if kernel_options is not None and not isinstance(kernel_options, Mapping):
            raise AttnLangError(f"kernel_options must be a dict, got {type(kernel_options).__name__}")
        scale = _check_scale(scale, q.shape[-1])
        self._check_tensors(tensors, q.device)
        _declared_ranges(kernel_options, tensors)
        dtypes = {n: dtype_of_torch(t.dtype) for n, t in tensors.items()}
        self._bind(dtypes)
        return scale, dtypes

    def _plan(self, q, k, v, scale, backend, return_lse, kernel_options, tensors) -> CallPlan:
        scale, dtypes = self._static_checks(q, k, v, scale, backend, return_lse, kernel_options, tensors)
        B, Hq, Sq, _ = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        bound_original, bound_simple, bound_shift = self._bind(dtypes)
        empty = _empty_names(B, Hq, Sq, Skv)
        env: dict[str, object] = {  # an empty axis's entry, [0, 0], is never read (check_index_bounds' empty)
            "b": Interval(0, max(B - 1, 0)), "h": Interval(0, max(Hq - 1, 0)), "q_idx": Interval(0, max(Sq - 1, 0)),
            "kv_idx": Interval(0, max(Skv - 1, 0)), "q_len": Interval(Sq, Sq), "kv_len": Interval(Skv, Skv),
        }
        declared = _declared_ranges(kernel_options, tensors)
        env.update({n: declared[n] if n in declared else _value_range(t) for n, t in tensors.items()})
        for name, r in declared.items():
            _assert_within(name, tensors[name], r)
        shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        # the interval walk costs ~0.1 ms per call: once per bound expressions, sizes and value ranges
        fmax = _compute_max(q)

        def checks():
            check_index_bounds(bound_original, env, shapes, float32=fmax < 1e300, empty=empty)
            check_float_range(bound_original, env, fmax)
        _BOUNDS_OK.get((bound_original,), (tuple(env.items()), tuple(shapes.items()), fmax, empty), checks)
        score, sink = bound_simple.score, bound_simple.sink
        if bound_shift is not None and empty:
            # an empty call computes no score; with kv_len 0 its rows' lse is the sink itself (LANGUAGE.md), not
            # the shifted sink plus the shift
            (score, sink), bound_shift = self._bind_unshifted(dtypes), None
        elif bound_shift is not None and not _finite_rows(bound_shift, env, q, B, Hq, Sq, Skv, tensors):
            # A row term that is not finite masks its whole row: dropping it would change the result.
            (score, sink), bound_shift = self._bind_unshifted(dtypes), None
        # names_used walks the tree: a third of a warm call's host time before it was cached per bound expression
        used = _NAMES.get((score, bound_simple.mask), None, lambda: names_used(score) | names_used(bound_simple.mask))
        if sink is not None:
            used = used | _NAMES.get((sink,), None, lambda: names_used(sink))
        if return_lse and bound_shift is not None:
            used = used | _NAMES.get((bound_shift,), None, lambda: names_used(bound_shift))
        return CallPlan(
            score=score, mask=bound_simple.mask, lse_shift=bound_shift if return_lse else None,
            scale=scale, tensors={n: t for n, t in tensors.items() if n in used}, key=self._key,
            checked=self._checked, q_len=Sq,
            kv_len=Skv, batch=B, q_heads=Hq, kv_heads=Hkv,
            options={k: o for k, o in (kernel_options or {}).items() if k != VALUE_RANGES},
            return_lse=return_lse, value_ranges=env, sink=sink, normalize=self._normalize)

    def _bind(self, dtypes: Mapping[str, DType]):
        key = tuple(sorted((n, d.value) for n, d in dtypes.items()))
        got = self._bind_cache.get(key)
        if got is None:
            original = bind(self._checked, dtypes)
            simple = bind(Checked(self._simplified.score, self._simplified.mask, self._checked.tensors,
                                  self._checked.sources, self._simplified.sink), dtypes)
            shift = None
            if self._simplified.lse_shift is not None:
                # the shift is numeric: bind it in the score's place (the mask's place must be bool)
                shift = bind(Checked(self._simplified.lse_shift, self._simplified.mask, self._checked.tensors,
                                     self._checked.sources), dtypes).score
            got = (original, simple, shift)
            self._bind_cache[key] = got
        return got

    def _bind_unshifted(self, dtypes: Mapping[str, DType]):
        """(score, sink) before the shift rule, bound."""
        unshifted = getattr(self._simplified, "score_unshifted", None) or self._checked.score
        got = bind(Checked(unshifted, self._simplified.mask, self._checked.tensors, self._checked.sources,
                           self._simplified.sink_unshifted), dtypes)
        return got.score, got.sink

    def _check_tensors(self, tensors: Mapping[str, Any], device) -> None:
        wanted = self._checked.tensors
        for name, t in tensors.items():
            if name in self._params and name not in wanted:
                raise AttnLangError(f"{name!r} is a parameter of this variant (params={{{name!r}: "
                                    f"{self._params[name]!r}}}, fixed when it was compiled), not a tensor to pass "
                                    f"at call time; compile another variant for another value, or read a tensor "
                                    f"{name}[...] in the expression instead")
            try:
                check_named_tensor(name, t, wanted, device)
            except AttnLangError as e:
                if name not in wanted or not isinstance(t, torch.Tensor) or t.dim() == wanted[name]:
                    raise
                # as many dimensions as the expressions index: the caret under the first read
                where, node = _first_read(self._checked, name)
                raise AttnLangError.at(e.message, self._checked.sources[where], node.span, where) from None
        for name in sorted(wanted):
            if name not in tensors:
                where, node = _first_read(self._checked, name)
                raise AttnLangError.at(f"tensor {name!r} is read here but was not given; pass it as "
                                       f"{name}=<tensor> when calling the variant", self._checked.sources[where],
                                       node.span, where)


class _ZeroGrads(torch.autograd.Function):
    """Identity on ``x``; a zero gradient for each of ``extra`` (tensors ``x`` does not depend on)."""

    @staticmethod
    def forward(ctx, x, *extra):
        ctx.like = [(e.shape, e.dtype, e.device) for e in extra]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like))


def _empty_names(B: int, Hq: int, Sq: int, Skv: int) -> frozenset:
    """The built-in names that take no value in a call of these sizes (check_index_bounds' ``empty``)."""
    return frozenset(name for name, size in (("b", B), ("h", Hq), ("q_idx", Sq), ("kv_idx", Skv), ("q_len", Sq),
                                             ("kv_len", Skv)) if size == 0)


def _empty_call(q, k, v, plan: CallPlan, backend: str, tensors):
    """(out, lse) of a call with B, Hq, Sq or Skv of 0, built here for every backend (no kernel runs, so none is
    asked whether it could: fa4 without a GPU and flex with gradients on the CPU give this result too; the
    backend's kernel_options are checked all the same).

    B, Hq or Sq of 0: out [B, Hq, Sq, Dv] and lse [B, Hq, Sq] hold no element. Skv of 0: no row has an allowed
    key, so (LANGUAGE.md) out is 0 and lse -inf, or with a sink lse = sink (out 0), as ``finish`` gives the eager
    backend's rows whose mask is all False. Gradients: zeros for q, k, v and the named tensors, plus what flows
    through the sink."""
    from .backends import option_problem
    bad = option_problem(backend, plan.options)
    if bad is not None:
        raise AttnLangError(bad)
    fd = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Sq = plan.batch, plan.q_heads, plan.q_len
    out = torch.zeros((B, Hq, Sq, v.shape[-1]), dtype=fd, device=q.device)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=fd, device=q.device)
    if out.numel() or lse.numel():
        out, lse = finish(out, lse, plan, fd, out_dtype=q.dtype)
    return with_zero_grads(out.to(q.dtype), lse_float32(lse), (q, k, v, *(tensors[n] for n in sorted(tensors))),
                           plan.return_lse)


def with_zero_grads(out, lse, inputs, with_lse: bool = True):
    """(out, lse) giving a zero gradient to each of ``inputs`` that requires grad (lse too when ``with_lse``), so
    that an empty call's ``out.sum().backward()`` works and fills every leaf's .grad, as a computed call does."""
    needing = [t for t in inputs if t.requires_grad] if torch.is_grad_enabled() else []
    if needing:
        out = _ZeroGrads.apply(out, *needing)
        if with_lse:
            lse = _ZeroGrads.apply(lse, *needing)
    return out, lse


def _connect_unread(out, lse, plan: CallPlan, tensors):
    """A bound tensor that requires grad but that the simplified call does not read (a per-row term dropped from
    the score moves softmax by nothing): give it a zero gradient, as the unsimplified variant would."""
    read = names_used(plan.score)  # a tensor read only by the mask (a bool) carries no gradient either
    if plan.sink is not None:
        read |= names_used(plan.sink)
    grads = {n: t for n, t in tensors.items() if t.requires_grad}
    unread = [t for n, t in sorted(grads.items()) if n not in read]
    if unread:
        out = _ZeroGrads.apply(out, *unread)
    if lse is not None and plan.return_lse:
        read_lse = read | (names_used(plan.lse_shift) if plan.lse_shift is not None else set())
        unread = [t for n, t in sorted(grads.items()) if n not in read_lse]
        if unread:
            lse = _ZeroGrads.apply(lse, *unread)
    return out, lse


def _not_plain(p: "Variant") -> str:
    """What keeps ``p`` from composing by its mask alone ('' when nothing does)."""
    if p.canonical[0] != "score" or p.canonical[2]:
        return f"score {p.score!r}"
    if getattr(p, "sink", None) is not None:
        return f"sink {p.sink!r}"
    return "normalize=False" if getattr(p, "normalize", True) is not True else ""


def _compose(op: str, *parts) -> "Variant":
    from .compose import compose_masks
    symbol = {"and": "'&'", "or": "'|'", "not": "'~'"}[op]
    for p in parts:
        if not isinstance(p, Variant):
            raise AttnLangError(f"{symbol} composes two attnlang Variants, got {type(p).__name__}")
    mask, params = compose_masks(op, [{"mask": p.mask, "params": p.params, "score": p.score, "plain": not why,
                                       "why": why} for p, why in ((p, _not_plain(p)) for p in parts)])
    return compile("score", mask, params)


def _first_read(checked: Checked, name: str):
    """(where, Index node) of the first read of tensor ``name``: in the checked expressions, else in the text as
    written (a read inside a binding the result never uses, or a reduction over range(0), is gone from the checked
    trees, yet the tensor is one the variant reads: tensor_names lists it and a call must pass it)."""
    checked_trees = ((w, checked.expr(w)) for w in checked.wheres)
    written_trees = ((w, parse(checked.sources[w], where=w)) for w in checked.wheres)  # parsed only if needed
    for where, tree in itertools.chain(checked_trees, written_trees):
        for node in walk(tree):
            if isinstance(node, Index) and node.tensor == name:
                return where, node
    raise KeyError(name)


def _finite_rows(shift, env, q, B, Hq, Sq, Skv, tensors) -> bool:
    """Whether the dropped row term is finite in the compute dtype (float32, float64 for float64 q) for every
    (b, h, q_idx): by intervals when they can tell, else by evaluating it on the [B, Hq, Sq] grid. A term past
    float32's range (``score - t[q_idx] * 1e30``) is not: the score itself then leaves the range in the kernel,
    where +inf is an error and -inf masks, and lse stays -inf only where out is 0."""
    fmax = _compute_max(q)
    r = bounds(shift, env)
    if -fmax <= r.lo and r.hi <= fmax:
        return True
    from .lower_torch import row_values
    with torch.no_grad():
        val = row_values(shift, B, Hq, Sq, Skv, tensors, torch.float64, q.device)
    return bool((val.abs() <= fmax).all())


def _compute_max(q: torch.Tensor) -> float:
    """The largest finite value of the dtype every backend computes scores in for q's dtype."""
    return torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).max


def _call_key(q, k, v, scale, backend, return_lse, kernel_options, tensors):
    """What a call's CallPlan depends on, hashable and compared with == (tokens by identity); None when some part
    cannot be keyed (not a tensor, unhashable options, an inference tensor on CUDA): the call then plans afresh."""
    try:
        # values with their types: True == 1 == 1.0 and hash alike, so a warm scale=1 let scale=True (refused by
        # the checks) through, and a warm CPU_COMPILED=True the CPU_COMPILED=1 that flex's checks refuse
        opts = None if kernel_options is None else tuple(sorted((k_, type(x), x) for k_, x in kernel_options.items()))
        named = []
        for name, t in sorted(tensors.items()):
            if t.is_inference() and t.device.type != "cpu":
                return None  # no version counter and no checksum: nothing says its values are unchanged
            named.append((name, t.shape, t.dtype, t.device, t.requires_grad, MEMO.token(t)))
        # torch.Size is a tuple (hashable, == to the same sizes): no copies, ~10 us a warm call matters on the H200
        key = (backend, type(scale), scale, type(return_lse), return_lse, opts, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(),
               q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
               v.device, q.requires_grad, k.requires_grad, v.requires_grad, q.layout, k.layout, v.layout,
               tuple(named))  # layouts: a sparse q of a warm call's shape is refused by the checks, not run
        hash(key)
    except (AttributeError, TypeError, RuntimeError):
        return None  # the call's checks say what is wrong
    return key


# CallPlans a Variant keeps for its recent call keys (weakly holding their calls' named tensors). al.compile interns
# variants, so every layer of a model shares one Variant, and a layer passing its own tensors (per-layer sinks or
# slopes) has its own key, two in training (with and without gradients): 8 re-planned every call of a model of
# more than 4 layers (a 60-layer model: 180 plans in 3 steps instead of 60)
_WARM_PLANS = 64
_NAMES = IdentityMemo()  # bound expressions -> the names they read
_BOUNDS_OK = IdentityMemo(1024)  # (bound expressions, sizes and value ranges) that passed check_index_bounds


VALUE_RANGES = "value_ranges"  # kernel_options key: {tensor name: (lo, hi)}, declared instead of read


def _declared_ranges(kernel_options, tensors) -> dict[str, Interval]:
    """``kernel_options={"value_ranges": {name: (lo, hi)}}``: value ranges of named tensors the caller declares, so
    the call checks need not read them (a read syncs the device, which a CUDA graph being captured forbids, and
    which costs a sync per new version of a tensor written in place between calls)."""
    spec = kernel_options.get(VALUE_RANGES) if isinstance(kernel_options, Mapping) else None
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise AttnLangError(f"kernel_options['value_ranges'] must map tensor names to (lo, hi), got "
                            f"{type(spec).__name__}")
    out = {}
    for name, r in spec.items():
        if name not in tensors:
            raise AttnLangError(f"kernel_options['value_ranges'] names {name!r}, which is not a tensor of this call "
                                f"(tensors: {', '.join(sorted(tensors)) or 'none'})")
        ok = (isinstance(r, (tuple, list)) and len(r) == 2
              and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in r)
              and not any(isinstance(x, float) and math.isnan(x) for x in r) and r[0] <= r[1])
        if not ok:
            raise AttnLangError(f"kernel_options['value_ranges'][{name!r}] must be (lo, hi) numbers with lo <= hi, "
                                f"got {r!r}")
        out[name] = Interval(*(_float_bound(x) for x in r))
    return out


def _float_bound(x) -> float:
    """A declared bound as a float; an int past float64 (10**400) is +-inf, which contains it."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _assert_within(name: str, t: torch.Tensor, r: Interval) -> None:
    """The declared range is checked, not trusted: on a GPU by a device-side assert (no sync; it fails the step and
    the CUDA context), elsewhere at once as an AttnLangError."""
    if t.numel() == 0:
        return
    inside = ((t >= r.lo) & (t <= r.hi)).all()
    message = f"tensor {name!r} holds values outside its declared value_ranges [{r.lo}, {r.hi}]"
    if t.is_cuda:
        torch._assert_async(inside, message)
    elif not bool(inside):
        raise AttnLangError(message)


def _value_range(t: torch.Tensor) -> Interval:
    """min/max of a tensor's values, once per tensor object and version (a GPU read syncs the device)."""
    return MEMO.get(t, "range", tensor_range)


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttnLangError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested or t.layout != torch.strided:
            raise AttnLangError(f"{name} has layout {'nested' if t.is_nested else t.layout}; expected a dense "
                                f"(strided) tensor")
        if t.dim() != 4:
            raise AttnLangError(f"{name} must have 4 dimensions [batch, heads, seq_len, head_dim], got shape "
                                f"{tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise AttnLangError(f"{name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttnLangError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttnLangError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "meta":
        raise AttnLangError("q, k and v are on the meta device, which holds no values")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    Bv, Hv, Sv, _ = v.shape
    if not (B == Bk == Bv):
        raise AttnLangError(f"batch sizes differ: q {B}, k {Bk}, v {Bv} (layout [B, H, S, D])")
    if Hkv != Hv or Skv != Sv:
        raise AttnLangError(f"k and v must have the same heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Dk != D:
        raise AttnLangError(f"q and k head dims differ: {D} and {Dk}")
    if D == 0:
        raise AttnLangError(f"q and k have head dim 0 (q {tuple(q.shape)}, k {tuple(k.shape)}): a score is a dot "
                            f"product over the head dim, and its default scale 1/sqrt(D) is undefined")
    if Hkv == 0 and Hq:
        raise AttnLangError(f"k and v have no heads (k {tuple(k.shape)}) for q's {Hq} query heads; layout is "
                            f"[B, H, S, D]")
    if Hkv and Hq % Hkv:  # no heads at all (Hq = Hkv = 0) is an empty call, as is Hq = 0 (a multiple of Hkv)
        raise AttnLangError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}); layout is "
                            f"[B, H, S, D]")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise AttnLangError(f"scale must be a real number, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:  # an int past float64 (10**400)
        raise AttnLangError(f"scale must be finite, got an int of {len(str(abs(int(scale))))} digits") from None
    if not math.isfinite(scale):
        raise AttnLangError(f"scale must be finite, got {scale}")
    return scale


def _plain_scalar(value):
    """numpy scalars as the Python int, float or bool they hold (so configs stay JSON and equal ones hash alike)."""
    if type(value) in (bool, int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    return value


def _plain_params(params):
    if not isinstance(params, Mapping):
        return params
    return {name: _plain_scalar(value) for name, value in params.items()}


@functools.lru_cache(maxsize=1024)
def _compile_cached(score: str, mask: str, params: tuple, sink: str | None = None, normalize: bool = True) -> Variant:
    return Variant(score, mask, {name: value for name, (_, value) in params}, sink, normalize)


def _check_denominator_args(sink, normalize) -> None:
    if sink is not None and not isinstance(sink, str):
        raise AttnLangError(f"sink must be a string expression or None, got {type(sink).__name__}")
    if not isinstance(normalize, bool):
        raise AttnLangError(f"normalize must be True or False, got {normalize!r}")


def compile(score: str = "score", mask: str = "True", params: Mapping[str, Any] | None = None,
            sink: str | None = None, normalize: bool = True) -> Variant:
    """Compile an attention variant from a score expression and a mask expression (LANGUAGE.md).

    Args:
        score: how each pre-softmax score is modified; float; default "score".
        mask: which (q_idx, kv_idx) pairs may attend; bool; default "True".
        params: compile-time scalars (int, float or bool) by name. A param keeps its Python type, as a literal
            would: ``{"w": 3}`` is the int 3 and ``{"w": 3.0}`` the float 3.0. Where the int meets a float it is
            converted (LANGUAGE.md: int op float is float), and the canonical form spells it as the float literal,
            so ``score * w`` is one variant for both; elsewhere they differ (``q_idx // w`` is an int,
            ``q_idx // 3.0`` a float; ``w`` as an index must be an int). Likewise a sink ``"0"`` is ``"0.0"``.
        sink: the logit of one extra key per row that enters the softmax's denominator and carries no value
            (gpt-oss's learned per-head sinks ``"sinks[h]"``; "softmax plus one" (Miller 2023) is ``"0"``); a
            number expression of b, h, q_idx, q_len, kv_len, params and tensors. Default None: no sink.
        normalize: False gives the softmax's numerator alone, out = sum exp(s'') V (sigmoid attention,
            Ramapuram et al. 2024, with score ``log(sigmoid(score - b0))``); lse is unchanged. Default True.
    Returns:
        an immutable, hashable Variant.
    Raises:
        AttnLangError: any syntax, name or type error, with line, column and a caret under the token (a sink
            that reads ``score`` or ``kv_idx``, or is bool, included).
    """
    if not isinstance(score, str):
        raise AttnLangError(f"score must be a string, got {type(score).__name__}")
    if not isinstance(mask, str):
        raise AttnLangError(f"mask must be a string, got {type(mask).__name__}")
    if params is not None and not isinstance(params, Mapping):
        raise AttnLangError(f"params must be a dict of name -> scalar, got {type(params).__name__}")
    _check_denominator_args(sink, normalize)
    params = _plain_params(params)
    try:
        key = tuple(sorted((k, (type(v).__name__, v)) for k, v in (params or {}).items()))
        hash(key)
    except TypeError:
        return Variant(score, mask, params, sink, normalize)
    return _compile_cached(score, mask, key, sink, normalize)  # the type names keep 1, 1.0 and True apart


def from_config(config) -> Variant:
    """A Variant from ``Variant.to_config()``'s dict, its JSON text, or a YAML document with the same keys.

    Raises:
        AttnLangError: not a mapping, unknown keys, wrong types, or a bad expression (naming the key).
    """
    if isinstance(config, (str, bytes)):
        config = _load_text(config)
    if not isinstance(config, Mapping):
        raise AttnLangError(f"a variant config must be a mapping with keys {', '.join(CONFIG_KEYS)}, got "
                            f"{type(config).__name__}")
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if unknown:
        raise AttnLangError(f"unknown key {unknown[0]!r} in variant config; expected keys: {', '.join(CONFIG_KEYS)}")
    score = _constant_text(config.get("score", "score"), "score")
    mask = _constant_text(config.get("mask", "True"), "mask")
    params = config.get("params", {})
    sink = _constant_text(config.get("sink"), "sink")
    normalize = config.get("normalize", True)
    for key, value in (("score", score), ("mask", mask)):
        if not isinstance(value, str):
            raise AttnLangError(f"config key {key!r} must be a string expression, got {type(value).__name__}")
    if sink is not None and not isinstance(sink, str):
        raise AttnLangError(f"config key 'sink' must be a string expression, got {type(sink).__name__}")
    if not isinstance(normalize, bool):
        raise AttnLangError(f"config key 'normalize' must be true or false, got {normalize!r}")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise AttnLangError(f"config key 'params' must be a mapping of name -> scalar, got {type(params).__name__}")
    for name, value in params.items():
        if isinstance(value, bool) or isinstance(value, (int, float)):
            continue
        raise AttnLangError(f"config key 'params.{name}' must be an int, float or bool, got {type(value).__name__}")
    return compile(score, mask, params, sink, normalize)


def _constant_text(value, key: str):
    """A constant written as a YAML / JSON value (``mask: True``, ``score: 0.5``, ``sink: 0``) as the expression it
    spells; anything else unchanged (the type checks that follow report it)."""
    if key == "mask" and isinstance(value, bool):
        return "True" if value else "False"
    if key in ("score", "sink") and isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return repr(float(value)) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return value


def _no_duplicates(pairs) -> dict:
    out = {}
    for key, value in pairs:
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise AttnLangError(f"variant config keys are names; got a {type(key).__name__} key")
        if key in out:  # JSON and YAML keep the last silently; a config with two masks is a mistake
            raise AttnLangError(f"key {key!r} appears twice in the variant config")
        out[key] = value
    return out


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
            self.flatten_mapping(node)  # merge keys (<<): their entries come first, explicit keys override them
            pairs = [(self.construct_object(k, deep=deep), self.construct_object(v, deep=deep))
                     for k, v in node.value]
            cut = len(pairs) - explicit
            for pair in pairs[:cut]:
                _no_duplicates([pair])  # the key's type
            # later merged entries win, as PyYAML orders them; explicit keys win over all and may not repeat
            return {**dict(pairs[:cut]), **_no_duplicates(pairs[cut:])}
    return UniqueKeyLoader


# a config holds at most three expressions of parse.MAX_LENGTH characters and a few params: longer text is refused
# before any parser sees it (a 50 MB YAML document took 14 s to parse before the expression limit applied)
_MAX_CONFIG_TEXT = 4 * MAX_LENGTH + 20_000


def _load_text(text) -> Any:
    if isinstance(text, bytes):
        if len(text) > 4 * _MAX_CONFIG_TEXT:  # utf-8: at most 4 bytes a character
            raise AttnLangError(f"variant config text is {len(text)} bytes long; at most {_MAX_CONFIG_TEXT} "
                                f"characters are read")
        text = text.decode("utf-8", errors="replace")
    if len(text) > _MAX_CONFIG_TEXT:
        raise AttnLangError(f"variant config text is {len(text)} characters long; at most {_MAX_CONFIG_TEXT} are "
                            f"read (three expressions of {MAX_LENGTH} and params)")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError:
        pass
    except RecursionError:
        raise AttnLangError("variant config JSON is nested too deeply") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise AttnLangError(f"variant config JSON holds a value Python cannot read: {e}") from None
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency
        raise AttnLangError("variant config text is not JSON, and PyYAML is not installed to read YAML") from None
    try:
        return yaml.load(text, Loader=_yaml_loader())
    except RecursionError:
        raise AttnLangError("variant config YAML is nested too deeply") from None
    except (TypeError, ValueError) as e:  # e.g. a complex key (? [a, b]) that Python cannot hash
        raise AttnLangError(f"variant config YAML cannot be read as a mapping of names: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            raise AttnLangError(f"variant config is neither JSON nor YAML: {getattr(e, 'problem', e)}", text,
                                mark.line + 1, mark.column + 1, where="config") from None
        raise AttnLangError(f"variant config is neither JSON nor YAML: {e}") from None


def reference(q: torch.Tensor = _MISSING, k: torch.Tensor = _MISSING, v: torch.Tensor = _MISSING,
              variant: Variant = _MISSING, /, *extra, scale: float | None = None, return_lse: bool = False, **tensors):
    """The eager reference: ``variant(q, k, v, backend="eager", ...)``.

    Shapes and errors as ``Variant.__call__``.
    """
    if extra or variant is _MISSING:
        given = 4 + len(extra) if extra else sum(x is not _MISSING for x in (q, k, v, variant))
        raise AttnLangError(f"reference() takes four positional arguments (q, k, v, variant), got {given}; named "
                            f"tensors are passed by name")
    if not isinstance(variant, Variant):
        raise AttnLangError(f"reference() takes a Variant as its fourth argument, got {type(variant).__name__}")
    if "backend" in tensors:
        raise AttnLangError("reference() always runs the eager backend and takes no backend=; call the variant "
                            "itself to pick one")
    return variant(q, k, v, scale=scale, backend="eager", return_lse=return_lse, **tensors)


_op.set_loader(from_config)  # a compiled graph loaded in a fresh process names its variants by their configs
