"""Variant: equality and hashing by canonical form, immutability, pickling, configs (dict / JSON / YAML), the
call-time checks that stand before every backend, and al.reference == backend="eager"."""

import copy
import json
import math
import pickle

import pytest
import torch
import yaml

import attnlang as al

ALIBI = ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx")
DOC = "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"


def qkv(B=2, Hq=4, Hkv=2, Sq=5, Skv=7, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, Sq, D, generator=g).to(dtype), torch.randn(B, Hkv, Skv, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Skv, D, generator=g).to(dtype))


# ----- identity -----

SAME = [
    (("score", "q_idx >= kv_idx"), ("score", "(q_idx)>=(kv_idx)")),
    (("score", "q_idx >= kv_idx"), ("(score)", "q_idx   >=\n kv_idx")),
    (("score", "0 <= q_idx - kv_idx < 4"), ("score", "0 <= q_idx - kv_idx and q_idx - kv_idx < 4")),
    (("score", "not q_idx < kv_idx or False"), ("score", "~(q_idx < kv_idx) | False")),
    (ALIBI, ("score + (slope[h] * (kv_idx - q_idx))", "q_idx >= kv_idx")),
]


@pytest.mark.parametrize("a, b", SAME)
def test_equal_by_canonical_form(a, b):
    va, vb = al.compile(*a), al.compile(*b)
    assert va == vb and hash(va) == hash(vb)
    assert va.canonical == vb.canonical
    assert len({va, vb}) == 1
    assert {va: 1}[vb] == 1


def test_params_are_substituted_before_comparing():
    with_param = al.compile(mask="0 <= q_idx - kv_idx < window", params={"window": 4})
    literal = al.compile(mask="0 <= q_idx - kv_idx < 4")
    assert with_param == literal and hash(with_param) == hash(literal)
    other = al.compile(mask="0 <= q_idx - kv_idx < window", params={"window": 5})
    assert other != with_param


def test_different_variants_differ():
    variants = [
        al.compile(),
        al.compile(mask="q_idx >= kv_idx"),
        al.compile(mask="q_idx > kv_idx"),
        al.compile(mask="q_idx - kv_idx < w", params={"w": 1}),
        al.compile(mask="q_idx - kv_idx < w", params={"w": 1.0}),  # 1 and 1.0 are different constants
        al.compile(*ALIBI),
        al.compile(mask=DOC),
    ]
    assert len(set(variants)) == len(variants)
    for i, a in enumerate(variants):
        for j, b in enumerate(variants):
            assert (a == b) == (i == j)
    assert al.compile() != "score" and al.compile() != None  # noqa: E711


def test_immutable():
    var = al.compile(*ALIBI)
    with pytest.raises(AttributeError):
        var.score = "score"
    with pytest.raises(AttributeError):
        var.new_attribute = 1
    params = {"window": 3}
    windowed = al.compile(mask="q_idx - kv_idx < window", params=params)
    params["window"] = 100  # the caller's dict is not shared
    windowed.params["window"] = 100  # nor is the returned copy
    assert windowed.params == {"window": 3}
    assert windowed == al.compile(mask="q_idx - kv_idx < 3")


def test_pickle_and_copy():
    for var in (al.compile(*ALIBI), al.compile(mask="q_idx - kv_idx < w", params={"w": 2}), al.compile(mask=DOC)):
        for other in (pickle.loads(pickle.dumps(var)), copy.copy(var), copy.deepcopy(var)):
            assert other == var and hash(other) == hash(var)
            assert other.score == var.score and other.mask == var.mask and other.params == var.params
            assert other.tensor_names == var.tensor_names


def test_pickled_variant_runs():
    var = pickle.loads(pickle.dumps(al.compile(*ALIBI)))
    q, k, v = qkv()
    slope = torch.rand(4)
    torch.testing.assert_close(var(q, k, v, slope=slope, backend="eager"),
                               al.compile(*ALIBI)(q, k, v, slope=slope, backend="eager"))


def test_properties_and_repr():
    var = al.compile(*ALIBI)
    assert var.score == ALIBI[0] and var.mask == ALIBI[1] and var.params == {}
    assert var.tensor_names == ("slope",)
    assert al.compile(mask=DOC).tensor_names == ("doc",)
    assert "Variant(" in repr(var) and ALIBI[0] in repr(var)
    assert isinstance(var.canonical, tuple) and all(isinstance(s, str) for s in var.canonical)


# ----- configs -----

CONFIG_VARIANTS = [
    ("score", "True", None),
    (*ALIBI, None),
    ("cap * tanh(score / cap)", "q_idx >= kv_idx", {"cap": 30.0}),
    ("score", "0 <= q_idx - kv_idx < window", {"window": 256}),
    ("score", "q_idx >= kv_idx | full", {"full": True}),
    ("score", DOC, None),
    ("score", "q_idx >= kv_idx &\n  kv_idx < w", {"w": -3}),
]


@pytest.mark.parametrize("score, mask, params", CONFIG_VARIANTS)
def test_config_round_trip(score, mask, params):
    var = al.compile(score, mask, params)
    config = var.to_config()
    assert set(config) <= {"score", "mask", "params"}
    text = json.dumps(config)
    for form in (config, json.loads(text), text, text.encode(), yaml.safe_dump(config), yaml.safe_load(
            yaml.safe_dump(config))):
        again = al.from_config(form)
        assert again == var and hash(again) == hash(var)
        assert again.params == var.params
        assert {k: type(x) for k, x in again.params.items()} == {k: type(x) for k, x in var.params.items()}


def test_config_inside_a_model_config():
    var = al.compile(*ALIBI)
    model = {"hidden": 64, "attention": var.to_config()}
    loaded = json.loads(json.dumps(model))
    assert al.from_config(loaded["attention"]) == var


def test_config_defaults():
    assert al.from_config({}) == al.compile()
    assert al.from_config({"mask": "q_idx >= kv_idx"}) == al.compile(mask="q_idx >= kv_idx")
    assert al.from_config({"mask": "q_idx >= kv_idx", "params": None}) == al.compile(mask="q_idx >= kv_idx")
    assert al.from_config("mask: q_idx >= kv_idx\n") == al.compile(mask="q_idx >= kv_idx")


@pytest.mark.parametrize("config, word", [
    ([1, 2], "mapping"),
    (3, "mapping"),
    ({"score": "score", "extra": 1}, "unknown key 'extra'"),
    ({"score": True}, "'score'"),
    ({"mask": ["q_idx"]}, "'mask'"),
    ({"params": [1]}, "'params'"),
    ({"mask": "q_idx < w", "params": {"w": "3"}}, "params.w"),
    ({"mask": "q_idx < w", "params": {"w": [3]}}, "params.w"),
    ({"mask": "q_idx >="}, "end"),
    ({"mask": "q_idx < w"}, "'w' was not given"),
    ("{not json: [", "neither JSON nor YAML"),
    ("- a\n- b", "mapping"),
    ("", "mapping"),
])
def test_bad_configs(config, word):
    with pytest.raises(al.AttnLangError, match=word if not word.startswith("'") else None) as info:
        al.from_config(config)
    assert word in str(info.value)


# ----- call-time checks -----

def test_wrong_ndim_of_q_k_v():
    var = al.compile()
    q, k, v = qkv()
    for bad in ((q[0], k, v), (q, k[0], v), (q, k, v[..., None])):
        with pytest.raises(al.AttnLangError, match="4 dimensions"):
            var(*bad, backend="eager")


def test_dtype_checks():
    var = al.compile()
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="one dtype"):
        var(q, k.double(), v, backend="eager")
    with pytest.raises(al.AttnLangError, match="one dtype"):
        var(q.half(), k.half(), v, backend="eager")
    with pytest.raises(al.AttnLangError, match="dtype"):
        var(q.long(), k.long(), v.long(), backend="eager")
    with pytest.raises(al.AttnLangError, match="dtype"):
        var(q.bool(), k.bool(), v.bool(), backend="eager")


def test_device_checks():
    var = al.compile(*ALIBI)
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="device"):
        var(q, k.to("meta"), v, backend="eager", slope=torch.rand(4))
    with pytest.raises(al.AttnLangError, match="'slope' is on meta"):
        var(q, k, v, backend="eager", slope=torch.rand(4, device="meta"))


def test_shape_checks():
    var = al.compile()
    q, k, v = qkv(Hq=4, Hkv=2)
    with pytest.raises(al.AttnLangError, match="multiple"):
        var(*qkv(Hq=3, Hkv=2), backend="eager")
    with pytest.raises(al.AttnLangError, match="multiple"):
        var(*qkv(Hq=2, Hkv=4), backend="eager")
    with pytest.raises(al.AttnLangError, match="batch"):
        var(q, k[:1], v[:1], backend="eager")
    with pytest.raises(al.AttnLangError, match="same heads and length"):
        var(q, k, v[:, :, :3], backend="eager")
    with pytest.raises(al.AttnLangError, match="head dims"):
        var(q, k[..., :4], v, backend="eager")
    with pytest.raises(al.AttnLangError, match="head dim 0"):  # empty lengths are results (below); D = 0 is not
        var(q[..., :0], k[..., :0], v, backend="eager")
    with pytest.raises(al.AttnLangError, match="torch.Tensor"):
        var(q.tolist(), k, v, backend="eager")
    out = var(q, k, v[..., :3], backend="eager")  # v may have its own head dim
    assert out.shape == (2, 4, 5, 3)


def test_tensor_checks():
    var = al.compile(*ALIBI)
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="'slope' has 2 dimensions"):
        var(q, k, v, backend="eager", slope=torch.rand(4, 1))
    with pytest.raises(al.AttnLangError, match="'extra' is given but neither expression reads it"):
        var(q, k, v, backend="eager", slope=torch.rand(4), extra=torch.rand(4))
    with pytest.raises(al.AttnLangError, match="must be a torch.Tensor, got list"):
        var(q, k, v, backend="eager", slope=[0.5] * 4)
    with pytest.raises(al.AttnLangError, match="must be a torch.Tensor, got float"):
        var(q, k, v, backend="eager", slope=0.5)
    with pytest.raises(al.AttnLangError, match="complex"):
        var(q, k, v, backend="eager", slope=torch.rand(4, dtype=torch.complex64))
    with pytest.raises(al.AttnLangError, match="size 3"):
        var(q, k, v, backend="eager", slope=torch.rand(3))


def test_tensor_of_the_wrong_rank_points_at_its_first_read():
    mask = "q_idx >= kv_idx &\n  bias[h, q_idx] > 0"
    var = al.compile("score", mask)
    q, k, v = qkv()
    for bad in (torch.rand(4), torch.rand(4, 8, 2), torch.tensor(1.0)):
        with pytest.raises(al.AttnLangError, match="dimensions") as info:
            var(q, k, v, backend="eager", bias=bad)
        err = info.value
        assert err.where == "mask" and err.source == mask and (err.line, err.column) == (2, 3)
        assert str(err).split("\n")[-1] == "    " + "  " + "^" * len("bias[h, q_idx]")


def test_missing_tensor_points_at_its_first_read():
    score = "score + 0.5 * bias[h, kv_idx]"
    mask = "q_idx >= kv_idx &\n  bias[h, q_idx] > 0"
    var = al.compile(score, mask)
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError) as info:
        var(q, k, v, backend="eager")
    err = info.value
    assert "'bias' is read here but was not given" in err.message
    assert err.where == "score" and err.source == score
    assert (err.line, err.column) == (1, 15)
    assert str(err).split("\n")[-1] == "    " + " " * 14 + "^" * len("bias[h, kv_idx]")

    only_mask = al.compile("score", mask)
    with pytest.raises(al.AttnLangError) as info:
        only_mask(q, k, v, backend="eager")
    assert info.value.where == "mask" and (info.value.line, info.value.column) == (2, 3)


@pytest.mark.parametrize("scale, word", [
    ("0.1", "real number"), (True, "real number"), (math.inf, "finite"), (math.nan, "finite"),
    (torch.tensor([0.1, 0.2]), "real number"), (1j, "real number"),
])
def test_bad_scale(scale, word):
    var = al.compile()
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match=word):
        var(q, k, v, backend="eager", scale=scale)


def test_scale_accepts_ints_and_numpy_like_reals():
    var = al.compile()
    q, k, v = qkv()
    a = var(q, k, v, backend="eager", scale=1)
    b = var(q, k, v, backend="eager", scale=1.0)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["EAGER", "torch", "", None, "flex2"])
def test_bad_backend_name(backend):
    var = al.compile()
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="backend"):
        var(q, k, v, backend=backend)


def test_bad_return_lse_and_kernel_options():
    var = al.compile()
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="return_lse"):
        var(q, k, v, backend="eager", return_lse=1)
    with pytest.raises(al.AttnLangError, match="kernel_options"):
        var(q, k, v, backend="eager", kernel_options=[("BLOCK", 64)])


def test_call_keywords_are_not_tensors():
    var = al.compile()
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="three positional"):
        var(q, k, v, q, backend="eager")  # q, k, v only positionally; nothing else positional


# ----- reference -----

@pytest.mark.parametrize("score, mask, params, tensors", [
    (*ALIBI, None, {"slope": torch.tensor([0.5, 0.25, 0.125, 0.0625])}),
    ("score", DOC, None, {"doc": torch.tensor([0, 0, 1, 1, 1, 2, 2])}),
    ("cap * tanh(score / cap)", "q_idx >= kv_idx", {"cap": 5.0}, {}),
])
def test_reference_equals_eager(score, mask, params, tensors):
    var = al.compile(score, mask, params)
    q, k, v = qkv()
    for scale in (None, 0.3):
        out, lse = al.reference(q, k, v, var, scale=scale, return_lse=True, **tensors)
        out2, lse2 = var(q, k, v, backend="eager", scale=scale, return_lse=True, **tensors)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)
        assert torch.equal(al.reference(q, k, v, var, scale=scale, **tensors), out)


def test_reference_checks_its_arguments():
    q, k, v = qkv()
    with pytest.raises(al.AttnLangError, match="Variant"):
        al.reference(q, k, v, "q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError, match="'slope' is read here"):
        al.reference(q, k, v, al.compile(*ALIBI))


def test_auto_backend_on_cpu_matches_eager():
    var = al.compile(*ALIBI)
    q, k, v = qkv()
    slope = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out, lse = var(q, k, v, slope=slope, return_lse=True)
    ref, ref_lse = al.reference(q, k, v, var, slope=slope, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_inference_mode_tensors(backend):
    # inference tensors keep no version counter: the per-tensor caches must not need one
    v = al.compile("score + bias[h]", "doc[q_idx] == doc[kv_idx]")
    with torch.inference_mode():
        q = torch.randn(1, 2, 5, 4)
        bias, doc = torch.randn(2), torch.tensor([0, 0, 1, 1, 1])
        out = v(q, q, q, backend=backend, bias=bias, doc=doc)
        ref = v(q, q, q, backend="eager", bias=bias, doc=doc)
    torch.testing.assert_close(out, ref)


# ----- warm calls: the last call's plan again (Variant._warm_plan) -----

def _counting_plans(monkeypatch, variant):
    made = []
    real = al.Variant._plan

    def counted(self, *args):
        made.append(1)
        return real(self, *args)
    monkeypatch.setattr(al.Variant, "_plan", counted)
    return made


def test_a_warm_call_reuses_its_plan_and_a_changed_call_plans_again(monkeypatch):
    var = al.compile(score="score + bias[kv_idx % 8]", mask="q_idx >= kv_idx")
    made = _counting_plans(monkeypatch, var)
    q = torch.randn(1, 2, 8, 4)
    bias = torch.randn(8)
    first = var(q, q, q, bias=bias)
    var(q, q, q, bias=bias)
    assert len(made) == 1
    var(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), bias=bias)  # new shapes
    var(q, q, q, bias=bias.clone())  # another tensor, same values
    with torch.no_grad():
        var(q, q, q, bias=bias)  # another grad mode
    var(q, q, q, bias=bias, return_lse=True)
    assert len(made) == 5
    bias.mul_(3.0)  # in place: the plan's value ranges are stale
    again = var(q, q, q, bias=bias)
    assert len(made) == 6
    torch.testing.assert_close(again, var(q, q, q, bias=bias.clone()))
    assert not torch.allclose(first, again)


def test_a_kept_plan_does_not_keep_its_calls_named_tensors_alive(monkeypatch):
    # a Variant keeps its last 8 plans for warm calls, and each held its call's named tensors: a per-step bias or
    # mask outlived the step by 8 calls, and a non-leaf one with it the graph that made it (found by the lifetime
    # audit: weakrefs to a step's tensors after del)
    import gc
    import weakref
    var = al.compile(score="score + bias[h, q_idx, kv_idx]", mask="doc[q_idx] == doc[kv_idx]")
    made = _counting_plans(monkeypatch, var)
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    refs = []
    for step in range(3):
        made_by = torch.randn(6, 6, requires_grad=True)  # bias is not a leaf: its grad_fn holds made_by
        bias = (made_by * 2.0).expand(2, 6, 6)
        doc = torch.tensor([0, 0, 0, 1, 1, 1])
        out = var(q, q, q, backend="eager", bias=bias, doc=doc)
        again = var(q, q, q, backend="eager", bias=bias, doc=doc)  # warm: the kept plan reads them again
        torch.testing.assert_close(again, out)
        if step == 0:
            out.sum().backward()
        refs += [weakref.ref(bias), weakref.ref(doc), weakref.ref(made_by)]
        del bias, doc, made_by, out, again
    gc.collect()
    assert len(made) == 3 and [r() for r in refs] == [None] * len(refs)


def test_a_warm_call_still_checks_a_tensor_written_in_place():
    # the index bounds were proved for the old values: after the write the call must check again and refuse
    var = al.compile(score="score + table[idx[kv_idx]]")
    q = torch.randn(1, 1, 4, 4)
    idx, table = torch.tensor([0, 1, 2, 3]), torch.randn(4)
    var(q, q, q, idx=idx, table=table)
    idx[2] = 7
    with pytest.raises(al.AttnLangError, match="idx|table"):
        var(q, q, q, idx=idx, table=table)


def test_unhashable_kernel_options_plan_every_call(monkeypatch):
    var = al.compile(score="score + t[kv_idx]")
    made = _counting_plans(monkeypatch, var)
    q = torch.randn(1, 1, 4, 4)
    t = torch.randn(4)
    for _ in range(2):
        var(q, q, q, t=t, backend="eager", kernel_options=None)
    assert len(made) == 1
    opts = {"value_ranges": {"t": (-10.0, 10.0)}}
    for _ in range(2):
        try:
            var(q, q, q, t=t, kernel_options=opts)
        except al.AttnLangError:
            pass  # whatever the options mean here: the point is that nothing was reused
    assert len(made) == 3


def test_a_model_of_many_layers_with_their_own_tensors_reuses_its_plans(monkeypatch):
    # al.compile interns variants, so 40 layers share one Variant, each passing its own sink tensor: with only 8
    # plans kept, every call of every step planned again
    var = al.compile(mask="q_idx >= kv_idx", sink="sinks[h]")
    made = _counting_plans(monkeypatch, var)
    sinks = [torch.randn(2) for _ in range(40)]
    q = torch.randn(1, 2, 6, 4)
    for _ in range(3):
        for layer in range(40):
            var(q, q, q, backend="eager", sinks=sinks[layer])
    assert len(made) == 40


def test_plans_of_freed_tensors_leave_the_warm_cache_with_what_their_memos_hold():
    # a backend's per-plan memo may hold what it derived from a named tensor (fa4's kernel arguments: an int32
    # copy of an int64 table): a plan whose tensors were freed can never be hit again, and is dropped at the next
    # new plan, with what its memo holds
    import gc
    import weakref
    var = al.compile(score="score + bias[kv_idx]", mask="True")
    q = torch.randn(1, 2, 6, 4)
    bias = torch.randn(6)
    var(q, q, q, backend="eager", bias=bias)
    (plan,) = [p for p in var._warm.values() if "bias" in p.tensors]
    derived = plan.memo["derived"] = bias.to(torch.float64)
    refs = [weakref.ref(plan), weakref.ref(derived)]
    del bias, plan, derived
    gc.collect()
    var(q, q, q, backend="eager", bias=torch.randn(6))  # another step's tensor: a new plan
    assert [r() for r in refs] == [None, None]


# ----- empty inputs (size 0): the result built before any backend, as torch's scaled_dot_product_attention -----

EMPTY_SHAPES = [  # (B, Hq, Hkv, Sq, Skv)
    (0, 4, 2, 5, 7),   # an empty batch (dynamic batching)
    (2, 0, 0, 5, 7),   # no heads at all
    (2, 0, 2, 5, 7),   # no query heads (0 is a multiple of Hkv)
    (2, 4, 2, 0, 7),   # an empty query block
]
BACKENDS_ALL = ["auto", "eager", "flex", "fa4"]  # fa4 and flex run no kernel for an empty call: no GPU needed


@pytest.mark.parametrize("backend", BACKENDS_ALL)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_an_empty_batch_heads_or_queries_give_an_empty_result_with_gradients(shape, backend, dtype):
    B, Hq, Hkv, Sq, Skv = shape
    q, k, v = (t.requires_grad_() for t in qkv(B, Hq, Hkv, Sq, Skv, dtype=dtype))
    v_ = torch.randn(B, Hkv, Skv, 3, dtype=dtype, requires_grad=True)  # Dv != D
    slope = torch.rand(Hq, requires_grad=True)
    out, lse = al.compile(*ALIBI)(q, k, v_, backend=backend, return_lse=True, slope=slope)
    assert out.shape == (B, Hq, Sq, 3) and out.dtype == dtype and out.device == q.device
    assert lse.shape == (B, Hq, Sq) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v_, slope):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS_ALL)
def test_no_keys_gives_out_0_and_lse_minus_inf_as_a_row_with_no_allowed_key(backend):
    q, k, v = (t.requires_grad_() for t in qkv(Sq=5, Skv=0))
    out, lse = al.compile(mask="q_idx >= kv_idx")(q, k, v, backend=backend, return_lse=True)
    assert out.shape == q.shape and not out.any() and (lse == -math.inf).all() and lse.shape == q.shape[:3]
    out.sum().backward()
    assert not q.grad.any() and k.grad.shape == k.shape and v.grad.shape == v.shape


NO_KEY_SINKS = [  # (score, sink, normalize): mask "q_idx + 100 <= kv_idx" allows no key at these lengths
    ("score", "sk[h]", True),
    ("score + bias[q_idx]", "0.1 * q_idx - sk[h]", True),  # a per-row term the simplifier moves into lse_shift
    ("log(sigmoid(score))", "sk[h] + bias[q_idx]", False),
]


@pytest.mark.parametrize("backend", BACKENDS_ALL)
@pytest.mark.parametrize("score, sink, normalize", NO_KEY_SINKS)
def test_no_keys_with_a_sink_gives_what_eager_gives_a_row_whose_mask_is_all_false(score, sink, normalize, backend):
    var = al.compile(score=score, mask="q_idx + 100 <= kv_idx", sink=sink, normalize=normalize)
    q, k, v = qkv(Sq=5, Skv=3, dtype=torch.float64)
    named = {"sk": torch.randn(4, dtype=torch.float64), "bias": torch.randn(5, dtype=torch.float64)}
    named = {n: t for n, t in named.items() if n in var.tensor_names}
    ref_out, ref_lse = var(q, k, v, backend="eager", return_lse=True, **named)  # keys, none allowed
    out, lse = var(q, k[:, :, :0], v[:, :, :0], backend=backend, return_lse=True, **named)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert not out.any() and torch.isfinite(lse).all() and lse.dtype == torch.float64


def test_no_keys_with_a_sink_gradients_reach_the_sinks_tensors():
    var = al.compile(mask="q_idx >= kv_idx", sink="sk[h] * sk[h] + 0.5 * q_idx")
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(1, 1, 0, 4, dtype=torch.float64, requires_grad=True)
    sk = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, kv, sk: var(q, kv, kv, return_lse=True, sk=sk), (q, kv, sk))
    out, lse = var(q, kv, kv, return_lse=True, sk=sk)
    (out.sum() + lse.sum()).backward()
    assert not q.grad.any() and kv.grad.shape == kv.shape
    torch.testing.assert_close(sk.grad, 2 * sk.detach() * 3)  # d lse / d sink = 1 in each of 3 rows


@pytest.mark.parametrize("scale", [None, 1.0])
def test_head_dim_0_stays_an_error(scale):
    q = torch.randn(1, 2, 3, 0)
    with pytest.raises(al.AttnLangError, match="head dim 0"):
        al.compile(mask="q_idx >= kv_idx")(q, q, q, scale=scale)


def test_query_heads_without_key_value_heads_are_an_error():
    q, kv = torch.randn(1, 2, 3, 4), torch.randn(1, 0, 3, 4)
    with pytest.raises(al.AttnLangError, match="no heads"):
        al.compile(mask="q_idx >= kv_idx")(q, kv, kv)


@pytest.mark.parametrize("backend", BACKENDS_ALL)
def test_an_empty_call_checks_named_tensors_where_no_position_is_needed(backend):
    doc_mask = al.compile(mask="doc[b, q_idx] == doc[b, kv_idx]")
    q, k, v = qkv(B=0, Sq=5, Skv=5)
    # at batch 0 a per-batch doc has no row: nothing is read, nothing is wrong
    assert doc_mask(q, k, v, backend=backend, doc=torch.zeros(0, 5, dtype=torch.int64)).shape == (0, 4, 5, 8)
    with pytest.raises(al.AttnLangError, match="index 1 of 'doc'") as e:  # too short along q_idx, any batch
        doc_mask(q, k, v, backend=backend, doc=torch.zeros(0, 4, dtype=torch.int64))
    assert "^" in str(e.value)
    with pytest.raises(al.AttnLangError, match="index it with 2"):
        doc_mask(q, k, v, backend=backend, doc=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(al.AttnLangError, match="dtype"):
        doc_mask(q, k, v, backend=backend, doc=torch.zeros(0, 5, dtype=torch.complex64))
    with pytest.raises(al.AttnLangError, match="was not given"):
        doc_mask(q, k, v, backend=backend)
    with pytest.raises(al.AttnLangError, match="index 1 of 'bias'"):  # a constant index: wrong at any size
        al.compile(score="score + bias[h, 5]")(q, k, v, backend=backend, bias=torch.zeros(4, 3))
    # no keys: the sink is computed on every row, so its reads are checked
    q, k, v = qkv(Sq=5, Skv=0)
    with pytest.raises(al.AttnLangError, match="index 0 of 'sk'"):
        al.compile(mask="q_idx >= kv_idx", sink="sk[h]")(q, k, v, backend=backend, sk=torch.zeros(3))
    with pytest.raises(al.AttnLangError, match="kernel_options"):
        al.compile(mask="q_idx >= kv_idx")(q, k, v, backend=backend, kernel_options={"no_such_option": 1})


def test_the_bounds_checks_of_an_empty_call_are_not_reused_for_a_call_with_positions():
    # the bounds checks of an empty call are weaker (no position, no read): a later call of other sizes checks
    # its own reads
    var = al.compile(score="score + bias[b]")
    q, k, v = qkv(B=0)
    var(q, k, v, bias=torch.zeros(0))
    q, k, v = qkv(B=1)
    with pytest.raises(al.AttnLangError, match="size 0"):
        var(q, k, v, bias=torch.zeros(0))
