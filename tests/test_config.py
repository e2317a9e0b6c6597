"""Variants as plain data: to_config / from_config round trips through dicts, JSON and YAML for every gallery
variant, variants nested in a model config, and AttnLangErrors that name the offending key."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlang as al

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "__init__.py")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"gallery_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same_params(a: dict, b: dict) -> None:
    assert a == b
    assert {k: type(v) for k, v in a.items()} == {k: type(v) for k, v in b.items()}  # 64 stays int, 30.0 float


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_round_trips(path):
    v = _load(path).VARIANT
    config = v.to_config()
    # "sink" and "normalize" appear only when set (API.md): sigmoid attention has normalize=False
    assert {"score", "mask", "params"} <= set(config) <= {"score", "mask", "params", "sink", "normalize"}
    assert json.loads(json.dumps(config)) == config  # plain JSON data, nothing else inside
    for form in (config, json.dumps(config), json.dumps(config, indent=2), yaml.safe_dump(config),
                 yaml.safe_dump(config, default_flow_style=True)):
        back = al.from_config(form)
        assert back == v and hash(back) == hash(v)
        assert (back.score, back.mask) == (v.score, v.mask)
        _same_params(back.params, v.params)
        assert back.to_config() == config


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_variant_in_a_model_config(path):
    m = _load(path)
    model_config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "attnlang": m.VARIANT.to_config(),
                    "attnlang_layers": [m.VARIANT.to_config(), al.compile(mask="q_idx >= kv_idx").to_config()]}
    for text, load in ((json.dumps(model_config), json.loads), (yaml.safe_dump(model_config), yaml.safe_load)):
        loaded = load(text)
        assert loaded == model_config
        v = al.from_config(loaded["attnlang"])
        assert v == m.VARIANT
        assert [al.from_config(c) for c in loaded["attnlang_layers"]][0] == m.VARIANT
    # the loaded variant computes exactly what the original does
    q_len, kv_len = m.demo_lengths(40) if hasattr(m, "demo_lengths") else (40, 40)
    torch.manual_seed(0)
    q = torch.randn(1, 2, q_len, 8)
    k, w = (torch.randn(1, 2, kv_len, 8) for _ in range(2))
    named = m.tensors(1, 2, q_len, kv_len)
    torch.testing.assert_close(v(q, k, w, backend="eager", **named), m.VARIANT(q, k, w, backend="eager", **named),
                               rtol=0, atol=0)


def test_hand_written_yaml():
    text = """
    # a sliding window with a soft cap, as it would sit in a YAML model config
    score: cap * tanh(score / cap)
    mask: 0 <= q_idx - kv_idx < window
    params:
      window: 128
      cap: 50.0
    """
    v = al.from_config(text)
    assert v == al.compile("cap * tanh(score / cap)", "0 <= q_idx - kv_idx < window", {"window": 128, "cap": 50.0})
    _same_params(v.params, {"window": 128, "cap": 50.0})


def test_defaults_and_bytes():
    assert al.from_config({}) == al.compile()
    assert al.from_config({"mask": "q_idx >= kv_idx"}) == al.compile(mask="q_idx >= kv_idx")
    assert al.from_config({"mask": "q_idx >= kv_idx", "params": None}) == al.compile(mask="q_idx >= kv_idx")
    assert al.from_config(json.dumps({"mask": "q_idx >= kv_idx"}).encode()) == al.compile(mask="q_idx >= kv_idx")


@settings(max_examples=40, deadline=None)
@given(window=st.integers(1, 2**62), cap=st.floats(1e-6, 1e6, allow_nan=False), prefix=st.integers(0, 10**6),
       flag=st.booleans())
def test_round_trip_any_params(window, cap, prefix, flag):
    v = al.compile(score="where(flag, cap * tanh(score / cap), score)",
                   mask="0 <= q_idx - kv_idx < window | kv_idx < prefix",
                   params={"window": window, "cap": cap, "prefix": prefix, "flag": flag})
    for form in (v.to_config(), json.dumps(v.to_config()), yaml.safe_dump(v.to_config())):
        back = al.from_config(form)
        assert back == v
        _same_params(back.params, v.params)


@pytest.mark.parametrize("config, names", [
    ({"scor": "score"}, "'scor'"),
    ({"mask": "q_idx >= kv_idx", "window": 4}, "'window'"),
    ({"score": [1]}, "'score'"),
    ({"mask": None}, "'mask'"),
    ({"mask": 1}, "'mask'"),
    ({"params": [1]}, "'params'"),
    ({"mask": "kv_idx < w", "params": {"w": "3"}}, "params.w"),
    ({"mask": "kv_idx < w", "params": {"w": [3]}}, "params.w"),
    ({"mask": "kv_idx < w", "params": {"w": None}}, "params.w"),
    ({"mask": "kv_idx < w", "params": {"w": {"x": 1}}}, "params.w"),
    ({"mask": "q_idx >= kv_idx", "params": {"w": 3}}, "'w'"),
    ({"mask": "kv_idx < w"}, "'w'"),
    ({"mask": "kv_idx < w", "params": {"w": float("nan")}}, "'w'"),
    ({"mask": "q_idx >> kv_idx"}, "mask expression"),
    ({"score": "score +"}, "score expression"),
    ({"params": {"scale": 2}, "score": "score * scale"}, "'scale'"),
    ([{"mask": "q_idx >= kv_idx"}], "mapping"),
    ("[1, 2]", "mapping"),
    ("q_idx >= kv_idx", "mapping"),
    ("", "mapping"),
    ("{mask: [", "neither JSON nor YAML"),
    ("mask: q_idx >= kv_idx\nscor: score\n", "'scor'"),
    ("mask: q_idx >= kv_idx\nparams:\n  w: [1]\n", "params.w"),
])
def test_bad_configs_name_the_key(config, names):
    with pytest.raises(al.AttnLangError) as info:
        al.from_config(config)
    assert names in str(info.value)


def test_missing_and_extra_tensors_name_the_tensor():
    v = al.from_config({"score": "score + slope[h] * (kv_idx - q_idx)", "mask": "q_idx >= kv_idx"})
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(al.AttnLangError, match="'slope'"):
        v(q, q, q)
    with pytest.raises(al.AttnLangError, match="'bias'"):
        v(q, q, q, slope=torch.ones(2), bias=torch.ones(2))
    with pytest.raises(al.AttnLangError, match="'slope'"):
        v(q, q, q, slope=torch.ones(2, 2))  # wrong number of dimensions
    assert v.tensor_names == ("slope",)


def test_errors_are_value_errors_with_a_caret():
    with pytest.raises(ValueError) as info:
        al.from_config(json.dumps({"mask": "q_idx >= kv_idx & foo(kv_idx)"}))
    assert isinstance(info.value, al.AttnLangError)
    assert "^" in str(info.value) and info.value.where == "mask"


@pytest.mark.parametrize("text", ['{"mask": "q_idx >= kv_idx", "mask": "True"}',
                                  "mask: q_idx >= kv_idx\nmask: 'True'\n"])
def test_duplicate_keys_are_errors(text):
    with pytest.raises(al.AttnLangError, match="'mask'"):
        al.from_config(text)


def test_non_finite_params_are_errors():
    # configs stay strict JSON: inf belongs in the expression, not in params
    with pytest.raises(al.AttnLangError, match="'cap'"):
        al.compile(score="cap * tanh(score / cap)", params={"cap": math.inf})


def test_to_config_is_strict_json_for_finite_params():
    v = al.compile(score="cap * tanh(score / cap)", params={"cap": 30.0})
    json.dumps(v.to_config(), allow_nan=False)
    assert math.isfinite(al.from_config(json.dumps(v.to_config())).params["cap"])
