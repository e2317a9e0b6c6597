"""CPU tests of the CuTeDSL emitter (attnlang.emit_cute) and of the fa4 backend's CPU-side behaviour.

Golden files: tests/golden/fa4/<name>.py hold the emitted module of every LANGUAGE.md example (score_mod,
score_mod_bwd from the symbolic derivative, and mask_mod). Regenerate after an intended change with
``ATTNLANG_UPDATE_GOLDEN=1 pytest tests/test_fa4_emit.py``.
"""

import ast as pyast
import os
from pathlib import Path

import pytest
import torch

import attnlang as al
from attnlang.ast import DType
from attnlang.check import bind
from attnlang.diff import derivative
from attnlang.emit_cute import Unsupported, emit_module

GOLDEN = Path(__file__).parent / "golden" / "fa4"

# LANGUAGE.md's examples (and the benchmark's), with the element types their tensors have at call time
EXAMPLES = {
    "causal": ("score", "q_idx >= kv_idx", {"window": None}, {}),
    "sliding_window": ("score", "0 <= q_idx - kv_idx < window", {"window": 256}, {}),
    "alibi": ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", {}, {"slope": DType.FLOAT}),
    "softcap": ("cap * tanh(score / cap)", "q_idx >= kv_idx", {"cap": 30.0}, {}),
    "document": ("score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {}, {"doc": DType.INT}),
    "prefix_lm": ("score", "kv_idx < prefix | q_idx >= kv_idx", {"prefix": 1024}, {}),
    "decode_bottom_right": ("score", "kv_idx <= q_idx + kv_len - q_len", {}, {}),
    "relative_bias_2d": ("score + rel[h, clamp(q_idx - kv_idx + 8, 0, 16)]", "True", {}, {"rel": DType.FLOAT}),
    "python_semantics": ("score * float(q_idx // 3 - kv_idx % 5) + float(int(score))",
                         "~(q_idx % 4 == 1) | flag[h]", {}, {"flag": DType.BOOL}),
    # erf / cos / sin (with their derivatives) and integer bit operations (issue 20)
    "erf_cos_sin_bits": ("erf(score) + cos(score) * sin(score / 2)",
                         "((q_idx ^ kv_idx) & 3) != 1 | q_idx >> 2 <= kv_idx << 1 | (kv_idx | 8) == q_idx", {}, {}),
}


def _emit(name):
    score, mask, params, dtypes = EXAMPLES[name]
    params = {k: v for k, v in params.items() if v is not None}
    v = al.compile(score=score, mask=mask, params=params)
    c = bind(v.checked, dtypes)
    identity = score == "score"
    return emit_module(None if identity else c.score, None if mask == "True" else c.mask,
                       None if identity else derivative(c.score), tuple(sorted(dtypes)), header=name)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_golden_source(name):
    module = _emit(name)
    path = GOLDEN / f"{name}.py"
    if os.environ.get("ATTNLANG_UPDATE_GOLDEN") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(module.source)
    assert module.source == path.read_text(), f"emitted source differs from {path}"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_emitted_source_is_python_and_hashed(name):
    module = _emit(name)
    tree = pyast.parse(module.source)
    defined = [n.name for n in tree.body if isinstance(n, pyast.FunctionDef) and not n.name.startswith("_")]
    assert tuple(defined) == module.functions
    for fn in module.functions:
        assert f"{fn}.__cute_hash__ = 'attnlang-{module.key}-{fn}'" in module.source


def test_signatures_match_flash_attn_cute():
    module = _emit("alibi")
    assert "def score_mod(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):" in module.source
    assert "def score_mod_bwd(grad, score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):" in module.source
    assert "def mask_mod(b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):" in module.source


def test_identity_derivative_passes_gradient_through():
    assert "    return grad\n" in _emit("alibi").source


def test_keys_differ_between_variants_and_are_stable():
    keys = {name: _emit(name).key for name in EXAMPLES}
    assert len(set(keys.values())) == len(keys)
    assert _emit("softcap").key == keys["softcap"]


def test_common_subexpressions_emitted_once():
    v = al.compile(score="tanh(score / 7) * tanh(score / 7) + tanh(score / 7)")
    src = emit_module(v.checked.score, None, None).source
    assert src.count("cute.math.tanh(") == 1


def test_fastmath_switch():
    v = al.compile(score="tanh(score)")
    assert "fastmath=True" in emit_module(v.checked.score, None, None, fastmath=True).source
    assert "fastmath=True" not in emit_module(v.checked.score, None, None, fastmath=False).source


def test_unsupported_nodes_are_named():
    v = al.compile(score="score ** float(q_idx)")
    with pytest.raises(Unsupported, match="non-constant exponent"):
        emit_module(v.checked.score, None, None)


def test_backend_imports_and_declines_on_cpu():
    from attnlang.backends import fa4, select
    q = torch.randn(1, 2, 8, 16)
    v = al.compile(mask="q_idx >= kv_idx")
    plan = v._plan(q, q, q, None, "auto", False, None, {})
    assert "CUDA" in fa4.unsupported(q, plan)
    assert select(q, plan)[0] != "fa4"


def test_module_written_to_cache_dir(tmp_path, monkeypatch):
    from attnlang.backends import fa4
    monkeypatch.setenv("ATTNLANG_CACHE_DIR", str(tmp_path))
    module = _emit("causal")
    assert fa4.cache_dir() == tmp_path / "fa4"
    text = module.source
    assert "import cutlass" in text  # the module itself is imported only where CUTLASS exists


def _cpu_plan(score, mask, tensors, S=64):
    q = torch.randn(2, 4, S, 16)
    return al.compile(score=score, mask=mask)._plan(q, q, q, None, "eager", True, None, tensors)


def test_lowering_bakes_small_head_tables_and_loads_the_rest():
    from attnlang.backends import fa4
    plan = _cpu_plan("score * gain[h] + bias[kv_idx]", "doc[q_idx] == doc[kv_idx]",
                     {"gain": torch.rand(4), "bias": torch.randn(64), "doc": torch.arange(64) // 8})
    low = fa4.lowering(plan)
    assert low.tensors == ("bias", "doc")            # aux_tensors, in order
    assert "_TABLE_gain = (" in low.module.source    # baked
    assert low.mask_tensors == ("doc",)


def test_lowering_uses_kernel_flags_for_causal_and_windows():
    from attnlang.backends import fa4
    assert fa4.lowering(_cpu_plan("score", "q_idx >= kv_idx", {})).window == (None, 0)
    assert fa4.lowering(_cpu_plan("score", "0 <= q_idx - kv_idx < 16", {})).window == (15, 0)
    low = fa4.lowering(_cpu_plan("score", "kv_idx < 8 | q_idx >= kv_idx", {}))
    assert low.window == (None, None) and low.mask_mod


def test_window_flags_option_turns_a_window_into_a_mask_mod():
    from attnlang.backends import fa4
    q = torch.randn(2, 4, 64, 16)
    v = al.compile(mask="0 <= q_idx - kv_idx < 16")
    plan = v._plan(q, q, q, None, "eager", True, {"window_flags": False}, {})
    low = fa4.lowering(plan)
    assert low.window == (None, None) and low.mask_mod


@pytest.mark.parametrize("options, words", [({"windowflags": False}, "unknown kernel_options"),
                                            ({"dense": "yes"}, "True or False")])
def test_bad_options_are_named(options, words):
    from attnlang.backends import fa4
    q = torch.randn(1, 2, 8, 16)
    plan = al.compile(mask="q_idx >= kv_idx")._plan(q, q, q, None, "fa4", False, options, {})
    assert words in fa4.unsupported(q, plan)
    with pytest.raises(al.AttnLangError, match=words):
        al.compile(mask="q_idx >= kv_idx")(q, q, q, backend="fa4", kernel_options=options)


def test_a_shift_by_a_variable_amount_is_declined():
    v = al.compile(mask="(q_idx >> kv_idx % 4) == 0")
    with pytest.raises(Unsupported, match=r"\[0, 31\]"):
        emit_module(None, bind(v.checked, {}).mask, None, (), header="shift")
