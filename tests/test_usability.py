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


# ---------------------------------------------------------------------------------------------------------------
# explain: block sparsity of data-dependent masks from the tensors; --block-size; demo's up-front backend check

_DOC_MASK = "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"


def _doc(n=1000):
    return torch.arange(n) // 300


def _counts(bs) -> str:
    kinds = bs.kind
    return (f"{int((kinds == 0).sum())} empty, {int((kinds == 1).sum())} partial, {int((kinds == 2).sum())} full of "
            f"{kinds.numel()}")


def test_variant_explain_with_tensors_gives_block_sparsity_of_a_data_dependent_mask():
    v = al.compile(mask=_DOC_MASK)
    doc = _doc()
    report = v.explain(q_len=1000, kv_len=1000, block_size=64, doc=doc)
    want = v.block_sparsity(q_len=1000, kv_len=1000, block_size=64, doc=doc)
    assert f"blocks (64, 64): {_counts(want)}" in report and "from the values of doc" in report
    assert "pass it, explain(doc=...)" in v.explain(q_len=1000)          # without the tensor: says what is missing
    assert "give the lengths" in v.explain(doc=doc)                      # without lengths: says so
    with pytest.raises(al.AttnLangError, match="neither expression reads it"):
        v.explain(q_len=10, slope=torch.ones(2))
    with pytest.raises(al.AttnLangError, match="block"):
        v.explain(q_len=10, block_size=0, doc=doc)


def test_cli_explain_tensor_gives_block_sparsity(tmp_path, capsys):
    from attnlang.cli import main
    path = tmp_path / "doc.pt"
    torch.save(_doc(), path)
    assert main(["explain", "--mask", _DOC_MASK, "--q-len", "1000", "--tensor", f"doc={path}"]) == 0
    want = al.compile(mask=_DOC_MASK).block_sparsity(q_len=1000, kv_len=1000, doc=_doc())
    assert f"blocks (128, 128): {_counts(want)}" in capsys.readouterr().out


def test_cli_block_size_exists_where_a_message_asks_for_larger_blocks(tmp_path, capsys):
    from attnlang.cli import main
    long = str(1 << 40)
    assert main(["explain", "--mask", "q_idx >= kv_idx", "--q-len", long]) == 0
    out = capsys.readouterr().out
    assert "use a larger block_size" in out and "--block-size N" in out
    assert main(["explain", "--mask", "q_idx >= kv_idx", "--q-len", long, "--block-size", str(1 << 36)]) == 0
    assert "16 partial, 120 full of 256; density 0.5312" in capsys.readouterr().out
    assert main(["explain", "--mask", "q_idx >= kv_idx", "--q-len", "256", "--block-size", "64x128"]) == 0
    assert "blocks (64, 128)" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    png = tmp_path / "m.png"
    assert main(["explain", "--mask", "q_idx >= kv_idx", "--q-len", long, "--png", str(png)]) == 2
    assert "use a larger block_size" in capsys.readouterr().err
    assert main(["explain", "--mask", "q_idx >= kv_idx", "--q-len", long, "--png", str(png), "--block-size",
                 str(1 << 36)]) == 0
    assert png.exists()
    for bad in ("0", "4x", "1x2x3", "x"):
        with pytest.raises(SystemExit):
            main(["explain", "--block-size", bad])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_demo_fa4_without_a_gpu_says_why_once_up_front(capsys):
    from attnlang.cli import main
    assert main(["demo", "--backend", "fa4", "--seq-len", "16"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("FA4 needs a CUDA GPU") == 1 and "use --backend auto or eager" in captured.err
    assert "variant" not in captured.out   # no table, no per-example failures


def test_block_density_at_lengths_whose_pair_counts_pass_int64():
    v = al.compile(mask="q_idx >= kv_idx")
    for e in (10, 20, 40, 50):   # 2**40 x 2**40 pairs wrapped int64: density read 0.0
        assert v.block_sparsity(q_len=1 << e, kv_len=1 << e, block_size=1 << (e - 4)).density == 0.53125


# ---------------------------------------------------------------------------------------------------------------
# the testing kit: defaults that run wherever it runs, tensor strategies by name, ids with repeats for equalities

def _kit_case():
    from attnlang.testing import Shape, make_qkv, tensors_for
    v = al.compile("score + slope[h] * (kv_idx - q_idx)", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    shape = Shape(1, 2, 2, 9, 9, 8)
    return v, make_qkv(shape), tensors_for(v, 1, 2, 9, 9)


def test_testing_kit_default_call_runs_on_this_machine():
    from attnlang.testing import assert_backends_agree
    v, (q, k, vv), tensors = _kit_case()
    compared = assert_backends_agree(v, q, k, vv, **tensors)            # backend="flex", gradients where it has them
    if q.device.type == "cpu":
        assert compared == ("out", "lse")                               # flex has no CPU backward
        with pytest.raises(al.AttnLangError, match="no backward pass on the CPU"):
            assert_backends_agree(v, q, k, vv, grads=True, **tensors)  # insisting still says why not
    compared = assert_backends_agree(v, q, k, vv, backend="eager", **tensors)
    assert compared == ("out", "lse", "grad q", "grad k", "grad v", "grad slope")
    assert assert_backends_agree(v, q, k, vv, backend="eager", named_grads=False, **tensors)[-1] == "grad v"


def test_tensors_for_gives_ids_with_repeats_to_tensors_compared_for_equality():
    from attnlang.testing import tensors_for
    for mask in ("doc[q_idx] == doc[kv_idx]", "doc[b, q_idx] != doc[b, kv_idx] | q_idx == kv_idx",
                 "seg[kv_idx] == q_idx // 4"):
        v = al.compile(mask=mask)
        (name, t), = tensors_for(v, 2, 1, 40, 40).items()
        assert not t.is_floating_point(), (mask, t.dtype)                # floats would be equal on the diagonal only
        row = t.reshape(-1, t.shape[-1])[0]
        off_diagonal = (row[:, None] == row[None, :]).sum() - row.numel()
        assert off_diagonal > 0 and torch.equal(row, row.sort().values)  # repeats, in sorted runs (documents)
    # an int-typed read (an index) is int; a float compared with a float constant stays float
    got = tensors_for(al.compile(mask="slope[idx[kv_idx]] > 0.0"), 1, 1, 7, 7)
    assert got["idx"].dtype == torch.int64 and got["slope"].is_floating_point()
    assert tensors_for(al.compile(mask="t[kv_idx] == 0.5 | True"), 1, 1, 7, 7)["t"].is_floating_point()


def test_tensors_for_takes_strategies_by_name():
    from attnlang.testing import TENSOR_STRATEGIES, tensors_for
    v, _, _ = _kit_case()
    got = tensors_for(v, 1, 4, 30, 30, strategies={"slope": "positive", "doc": "sorted_ids"})
    assert (got["slope"] > 0).all() and torch.equal(got["doc"], got["doc"].sort().values)
    runs = tensors_for(v, 1, 4, 30, 30, strategies={"doc": lambda shape, g: torch.arange(shape[0]) // 10})
    assert runs["doc"].tolist() == [i // 10 for i in range(30)]
    assert set(TENSOR_STRATEGIES) >= {"ids", "sorted_ids", "normal", "positive", "coins"}
    for bad, words in (({"doc": "nope"}, "no such strategy"), ({"zz": "ids"}, "does not read"),
                       ({"doc": lambda s, g: torch.zeros(3, dtype=torch.long)}, "of shape"),
                       ({"doc": lambda s, g: torch.zeros(s)}, "reads it as int"),
                       ({"doc": lambda s, g: 1 / 0}, "ZeroDivisionError"), ({"doc": 5}, "callable")):
        with pytest.raises(al.AttnLangError, match=words):
            tensors_for(v, 1, 4, 30, 30, strategies=bad)


def test_named_tensors_draws_fresh_values_with_the_strategies():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from attnlang.testing import Shape, named_tensors
    v, _, _ = _kit_case()
    seen = set()

    @settings(max_examples=8, deadline=None, database=None)
    @given(data=st.data())
    def draw(data):
        t = data.draw(named_tensors(v, Shape(1, 2, 2, 9, 9, 8), strategies={"slope": "positive"}))
        assert (t["slope"] > 0).all() and not t["doc"].is_floating_point()
        seen.add(tuple(t["slope"].tolist()))
    draw()
    assert len(seen) > 1


def test_a_tensor_passed_under_a_params_name_says_it_is_a_param():
    v = al.compile(score="score * w", mask="True", params={"w": 2.0})
    q = torch.randn(1, 2, 4, 4)
    with pytest.raises(al.AttnLangError, match="'w' is a parameter of this variant"):
        v(q, q, q, w=torch.randn(2))
