"""Issue 19's usability items (the testing kit, the CLI, the transformers integration) and fa4's NaN semantics of
float min / max / clamp, one test each; each failed on the code before its change."""

import sys
import types

import pytest
import torch

import attnlang as al
from attnlang.check import bind
from attnlang.emit_cute import emit_module

# ---------------------------------------------------------------------------------------------------------------
# fa4: float min / max / clamp propagate NaN (as torch.minimum / maximum, eager and flex); fmin / fmax drop it


def _torch_cute(monkeypatch):
    """Stand-ins for ``cutlass`` and ``cutlass.cute`` over torch tensors (TensorSSA -> torch.Tensor), enough to run
    an emitted module without CUTLASS: the emitted text is then checked by what it computes."""
    cutlass = types.ModuleType("cutlass")
    cutlass.Float32, cutlass.Int32, cutlass.Boolean = torch.float32, torch.int32, torch.bool
    cute = types.ModuleType("cutlass.cute")
    cute.jit = lambda fn: fn
    cute.where = torch.where

    def full_like(x, value, dtype=None):
        return torch.full_like(x, value, dtype=dtype)
    cute.full_like = full_like
    cute.math = types.SimpleNamespace(
        exp2=lambda x, **kw: torch.exp2(x), log2=torch.log2, sqrt=torch.sqrt, tanh=lambda x, **kw: torch.tanh(x),
        floor=torch.floor, ceil=torch.ceil, erf=torch.erf, cos=torch.cos, sin=torch.sin)
    cutlass.cute = cute
    monkeypatch.setitem(sys.modules, "cutlass", cutlass)
    monkeypatch.setitem(sys.modules, "cutlass.cute", cute)


def _run_mask_mod(source: str, kv_len: int) -> torch.Tensor:
    namespace: dict = {}
    exec(compile(source, "<emitted>", "exec"), namespace)  # the test's own emitted module, not a user's string
    kv = torch.arange(kv_len, dtype=torch.int32)
    zero = torch.zeros_like(kv)
    info = types.SimpleNamespace(seqlen_q=kv_len, seqlen_k=kv_len)
    return namespace["mask_mod"](zero, zero, zero, kv, info, ())


@pytest.mark.parametrize("mask", [
    "max(sqrt(float(kv_idx) - 3.0), 0.5) <= 1.0",     # NaN for kv_idx < 3: max(NaN, 0.5) is NaN, NaN <= 1 False
    "min(sqrt(float(kv_idx) - 3.0), 1.5) >= 1.0",
    "min(1.5, sqrt(float(kv_idx) - 3.0)) >= 1.0",     # NaN second: chosen too
    "max(-1.0, sqrt(float(kv_idx) - 3.0)) <= 1.0",
    "clamp(sqrt(float(kv_idx) - 3.0), 0.5, 1.0) < 2.0",
])
def test_fa4_min_max_clamp_propagate_nan_like_eager(monkeypatch, mask):
    from attnlang.lower_torch import evaluate
    v = al.compile(mask=mask)
    checked = bind(v.checked, {})
    module = emit_module(None, checked.mask, None)
    assert "fmax" not in module.source and "fmin" not in module.source
    _torch_cute(monkeypatch)
    got = _run_mask_mod(module.source, 9)
    want = evaluate(checked.mask, {"kv_idx": torch.arange(9)}, {}).reshape(-1)
    assert not want[:3].any()                                        # eager: NaN-derived comparisons are False
    assert torch.equal(got.reshape(-1), want), (got, want)


def test_fa4_int_min_max_stay_plain_selects():
    v = al.compile(mask="min(q_idx, kv_idx + 2) >= max(kv_idx, 1)")
    source = emit_module(None, bind(v.checked, {}).mask, None).source
    assert "operator.eq(operator.eq(" not in source  # the NaN test only for floats
