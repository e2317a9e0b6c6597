"""Fuzzing the front end: whatever string a user writes, al.compile returns a Variant or raises AttnLangError
(never another exception, never a RecursionError), and a compiled variant runs or raises AttnLangError."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnlang as al
from attnlang.parse import MAX_DEPTH, MAX_LENGTH

GRAMMAR_CHARS = "abcdefghijklmnopqrstuvwxyz_ABCTFXYZ0123456789.eE+-*/%<>=!&|~()[], \n\t"
TOKENS = [
    "score", "q_idx", "kv_idx", "b", "h", "q_len", "kv_len", "x", "doc", "window", "scale", "backend",
    "where", "abs", "min", "max", "clamp", "exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "floor",
    "ceil", "sign", "float", "int", "foo",
    "0", "1", "2", "42", "0.5", "1e-3", "1e400", "99999999999999999999", "inf", "True", "False",
    "+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!=", "&", "|", "~", "and", "or", "not",
    "(", ")", "[", "]", ",", "\n",
]


def assert_clean(score="score", mask="True", params=None):
    try:
        var = al.compile(score, mask, params)
    except al.AttnLangError as e:
        text = str(e)  # rendering the caret must not fail either
        assert isinstance(text, str)
        if e.source is not None and e.line is not None:
            assert 1 <= e.line <= e.source.count("\n") + 1
            assert e.column >= 1
        return None
    return var


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=GRAMMAR_CHARS, max_size=60), st.booleans())
def test_grammar_characters(text, as_mask):
    assert_clean(mask=text) if as_mask else assert_clean(score=text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_unicode(text):
    assert_clean(score=text)
    assert_clean(mask=text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_bytes_and_non_strings(data):
    with pytest.raises(al.AttnLangError):
        al.compile(score=data)
    assert_clean(score=data.decode("latin-1"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=30), st.booleans(),
       st.dictionaries(st.sampled_from(["window", "x", "foo", "scale", "q_idx"]),
                       st.one_of(st.integers(-3, 3), st.floats(allow_nan=True), st.booleans()), max_size=2))
def test_token_soup(tokens, as_mask, params):
    text = " ".join(tokens)
    assert_clean(mask=text, params=params) if as_mask else assert_clean(score=text, params=params)


def _qkv():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 1, 6, 4, generator=g)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=14), st.lists(st.sampled_from(TOKENS), min_size=1,
                                                                             max_size=14))
def test_token_soup_that_compiles_also_runs_cleanly(score_tokens, mask_tokens):
    var = assert_clean(" ".join(score_tokens), "True")
    var2 = assert_clean("score", " ".join(mask_tokens))
    q, k = _qkv()
    tensors = {"x": torch.zeros(8, dtype=torch.long), "doc": torch.zeros(8)}
    for v in (var, var2):
        if v is None:
            continue
        given_tensors = {n: tensors[n] for n in v.tensor_names if n in tensors}
        try:
            out = v(q, k, k, backend="eager", **given_tensors)
        except al.AttnLangError:
            continue
        assert not torch.isnan(out).any()


# ----- very long and very deeply nested input -----

@pytest.mark.parametrize("text", [
    " + ".join(["score"] * 10_000),
    " + ".join(["1.0"] * 10_000),
    " & ".join(["q_idx >= kv_idx"] * 10_000),
    "score" + " ** 1" * 10_000,
    "(" * 10_000 + "score" + ")" * 10_000,
    "(" * 100_000 + "score" + ")" * 100_000,
    "exp(" * 10_000 + "score" + ")" * 10_000,
    "f(" * 10_000 + "score" + ")" * 10_000,
    "x[" * 10_000 + "h" + "]" * 10_000,
    "-" * 10_000 + "score",
    "~" * 10_000 + "True",
    "not " * 5_000 + "True",
    " < ".join(["q_idx"] * 5_000),
    "(" * 10_000 + "score",
    "score" + ")" * 10_000,
    "where(" * 3_000 + "True, 1.0, 2.0)" + ", 1.0, 2.0)" * 2_999,
    "score" + " + score" * (MAX_LENGTH // 8),
])
def test_long_and_deep_give_a_result_or_a_clean_error(text):
    for score, mask in ((text, "True"), ("score", text)):
        assert_clean(score, mask)


def test_just_below_the_limits_runs():
    q, k = _qkv()
    deep = "tanh(" * (MAX_DEPTH - 2) + "score" + ")" * (MAX_DEPTH - 2)
    long = "score" + " - 0.5" * (MAX_DEPTH - 1)
    parens = "(" * 5_000 + "score" + ")" * 5_000
    for text in (deep, long, parens):
        var = al.compile(score=text)
        out = var(q, k, k, backend="eager")
        assert torch.isfinite(out).all()
        assert isinstance(var.explain(), str) and hash(var) == hash(al.from_config(var.to_config()))


def test_over_the_limits_is_a_clean_error():
    with pytest.raises(al.AttnLangError, match="nested too deeply"):
        al.compile(score="tanh(" * (MAX_DEPTH + 1) + "score" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(al.AttnLangError, match="characters long"):
        al.compile(score="score" + " " * MAX_LENGTH)


# ----- differential fuzzing, round 3: shapes, layouts, dtypes, helpers, compile, block sparsity, extremes -----
# Each against an independent reference: test_properties.py's float64 interpreter for the attention itself, a
# dense bool grid from closures for block sparsity. Small example counts (CI); the same generators ran ~5000
# variants by hand.

import math  # noqa: E402

from test_properties import MASKS, SCORES, _f, node  # noqa: E402

from attnlang import testing as alt  # noqa: E402

_FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                       HealthCheck.data_too_large])
_DISCONTINUOUS = ("floor", "ceil", "sign", "//", "%", "int(", "<", ">", "==", "!=", "where")
_DECODE = node("(kv_idx <= q_idx + kv_len - q_len)", lambda e: e["kv_idx"] <= e["q_idx"] + e["kv_len"] - e["q_len"])


def _laid_out(shape, dtype, layout, g):
    """A float64-drawn tensor of ``shape`` in ``dtype`` and one of several memory layouts."""
    B, H, S, D = shape
    make = {
        "contiguous": lambda: torch.randn(B, H, S, D, generator=g, dtype=torch.float64),
        "transposed": lambda: torch.randn(B, S, H, D, generator=g, dtype=torch.float64).transpose(1, 2),
        "sliced": lambda: torch.randn(B, H, S, D + 3, generator=g, dtype=torch.float64)[..., 1:D + 1],
        "strided": lambda: torch.randn(B, H, 2 * S, D, generator=g, dtype=torch.float64)[:, :, ::2],
        "expanded": lambda: torch.randn(B, 1, S, D, generator=g, dtype=torch.float64).expand(B, H, S, D),
        "dim_transposed": lambda: torch.randn(B, H, D, S, generator=g, dtype=torch.float64).transpose(2, 3),
    }[layout]
    return make().to(dtype)


def _dense_reference(scores, allowed, v, group):
    vv = v.repeat_interleave(group, dim=1)
    s3 = torch.where(allowed, scores, torch.tensor(-math.inf, dtype=torch.float64))
    m = s3.amax(-1, keepdim=True)
    p = torch.exp(s3 - torch.where(m == -math.inf, 0.0, m))
    total = p.sum(-1)
    empty = total == 0
    out = (p / torch.where(empty, 1.0, total)[..., None]) @ vv
    return out, torch.where(empty, -math.inf, torch.log(torch.where(empty, 1.0, total)) + m[..., 0])


@st.composite
def _calls(draw):
    """One attention call: B > 1, GQA groups 1-8, q_len != kv_len (decode), odd lengths and head dims, v's head dim
    != q's, non-contiguous q / k / v, 16-bit to 64-bit floats, int tensors of every int dtype, some inputs
    requiring grad."""
    kv_len = draw(st.sampled_from([1, 3, 5, 17, 127, 129]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    score = draw(SCORES)
    if dtype != torch.float64 and any(t in score[0] for t in _DISCONTINUOUS):
        score = node("score", lambda e: e["score"])  # a last-ulp difference of q·k would flip a floor or a test
    return dict(B=draw(st.sampled_from([1, 2, 3])), Hkv=draw(st.sampled_from([1, 2])),
                group=draw(st.sampled_from([1, 2, 4, 8])), Skv=kv_len,
                Sq=draw(st.sampled_from([1, kv_len, 3, 129])), D=draw(st.sampled_from([1, 3, 8, 96, 257])),
                Dv=draw(st.sampled_from([None, 1, 5])), dtype=dtype, score=score,
                mask=draw(st.one_of(MASKS, st.just(_DECODE))),
                layouts=draw(st.tuples(*[st.sampled_from(["contiguous", "transposed", "sliced", "strided",
                                                          "expanded", "dim_transposed"])] * 3)),
                int_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])),
                float_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])),
                strided_tensors=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.1, 3.0])),
                grads=draw(st.sampled_from([(), ("q",), ("k", "v"), ("tf",), ("q", "tf")])),
                seed=draw(st.integers(0, 2 ** 20)))


@settings(_FUZZ, max_examples=5)
@given(_calls())
def test_shapes_layouts_and_dtypes_equal_the_float64_interpreter(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, grp, Sq, Skv, D, dt = c["B"], c["group"], c["Sq"], c["Skv"], c["D"], c["dtype"]
    Hq, Dv = c["Hkv"] * grp, c["Dv"] or c["D"]
    q = _laid_out((B, Hq, Sq, D), dt, c["layouts"][0], g)
    k = _laid_out((B, c["Hkv"], Skv, D), dt, c["layouts"][1], g)
    v = _laid_out((B, c["Hkv"], Skv, Dv), dt, c["layouts"][2], g)
    wide = 2 if c["strided_tensors"] else 1
    named = {"tf": torch.randn(wide * max(Hq, 4), generator=g, dtype=torch.float64).to(c["float_dtype"])[::wide],
             "ti": torch.randint(0 if c["int_dtype"] == torch.uint8 else -3, 9, (wide * Skv,),
                                 generator=g).to(c["int_dtype"])[::wide],
             "tb": (torch.rand(wide * Sq, generator=g) > 0.3)[::wide]}
    var = al.compile(c["score"][0], c["mask"][0])
    named = {n: t for n, t in named.items() if n in var.tensor_names}
    grads = {n: n in c["grads"] and (n != "tf" or "tf" in named) for n in ("q", "k", "v", "tf")}
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(D)
    # the reference, from the inputs as rounded to dt
    leaves = {n: t.detach().double().requires_grad_(grads[n]) for n, t in (("q", q), ("k", k), ("v", v))}
    if "tf" in named:
        leaves["tf"] = named["tf"].detach().double().requires_grad_(grads["tf"])
    env = {"score": leaves["q"] @ leaves["k"].repeat_interleave(grp, dim=1).transpose(-1, -2) * scale,
           "b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(Hq).view(1, Hq, 1, 1),
           "q_idx": torch.arange(Sq).view(1, 1, Sq, 1), "kv_idx": torch.arange(Skv).view(1, 1, 1, Skv),
           "q_len": torch.tensor(Sq), "kv_len": torch.tensor(Skv), "tf": leaves.get("tf"),
           "ti": named["ti"].long() if "ti" in named else None, "tb": named.get("tb")}
    shape = (B, Hq, Sq, Skv)
    want_s = torch.broadcast_to(_f(c["score"][1](env)), shape)
    allowed = torch.broadcast_to(c["mask"][1](env), shape)
    bad = bool(((torch.isnan(want_s) | (want_s == math.inf)) & allowed).any())
    want_out, want_lse = _dense_reference(want_s, allowed, leaves["v"], grp)
    (atol, rtol), (gatol, grtol) = alt.TOLERANCES[dt]
    msg = f"{c['score'][0]!r} {c['mask'][0]!r} {c}"
    for backend in ("eager", "flex"):
        with_grad = backend == "eager" and any(grads.values()) and not bad
        qq, kk, vv = (t.detach().clone().requires_grad_(with_grad and grads[n]) for n, t in zip("qkv", (q, k, v)))
        bound = {n: t.detach().clone().requires_grad_(with_grad and n == "tf" and grads["tf"])
                 for n, t in named.items()}
        if bad:
            with pytest.raises(al.AttnLangError, match="allowed position"):
                var(qq, kk, vv, backend=backend, scale=c["scale"], **bound)
            continue
        with torch.set_grad_enabled(with_grad):
            out, lse = var(qq, kk, vv, backend=backend, scale=c["scale"], return_lse=True, **bound)
        assert out.shape == (B, Hq, Sq, Dv) and out.dtype == dt, msg
        assert lse.dtype == (torch.float64 if dt == torch.float64 else torch.float32), msg
        alt._compare("out", out, want_out, atol, rtol, f"{backend}: {msg}")
        alt._compare("lse", lse, want_lse, max(atol, 2e-4), max(rtol, 2e-4), f"{backend}: {msg}")
        if not with_grad:
            continue
        gen = torch.Generator().manual_seed(1)
        g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        finite = torch.isfinite(want_lse)
        ref_leaves = [leaves[n] for n in ("q", "k", "v", "tf") if grads[n]]
        got_leaves = [t for t in (qq, kk, vv, bound.get("tf")) if t is not None and t.requires_grad]
        want_loss = (want_out * g_out).sum() + torch.where(finite, want_lse, 0.0).sum()
        got_loss = (out.double() * g_out).sum() + torch.where(finite, lse.double(), 0.0).sum()
        want = torch.autograd.grad(want_loss, ref_leaves, allow_unused=True) if want_loss.requires_grad else \
            [None] * len(ref_leaves)
        got = torch.autograd.grad(got_loss, got_leaves, allow_unused=True)
        for w, x, leaf in zip(want, got, ref_leaves):
            w = torch.zeros_like(leaf) if w is None else w
            x = torch.zeros_like(leaf) if x is None else x
            if torch.isfinite(w).all():  # the hand-written reference can NaN where attnlang does not
                tol = alt.TOLERANCES.get(x.dtype, alt.TOLERANCES[torch.float32])[1]
                alt._compare("grad", x, w, max(tol[0], gatol, 1e-5), max(tol[1], grtol, 1e-5), msg)


def _floor(a, c):
    return torch.div(a, c, rounding_mode="floor")


def _atoms():
    """(mask text, closure over a dense env) pairs: windows, prefixes (a param, a per-batch tensor), documents
    (sorted, unsorted, per batch, decode-aligned), block-causal, dilation, a top-k reduction, float tensors that
    may hold NaN / inf, bit tests, head-dependent offsets, a sum reduction."""
    def topk(e, K):
        hits = [e["topk"][e["h"], _floor(e["q"], 16), i] == _floor(e["k"], 16) for i in range(K)]
        return torch.stack(torch.broadcast_tensors(*hits)).any(0)
    return st.one_of(
        st.sampled_from([
            node("q_idx >= kv_idx", lambda e: e["q"] >= e["k"]),
            node("kv_idx <= q_idx + kv_len - q_len", lambda e: e["k"] <= e["q"] + e["Skv"] - e["Sq"]),
            node("kv_idx < prefix", lambda e: e["k"] < e["prefix"]),
            node("kv_idx < pre[b]", lambda e: e["k"] < e["pre"][e["b"]]),
            node("doc[q_idx] == doc[kv_idx]", lambda e: e["doc"][e["q"]] == e["doc"][e["k"]]),
            node("doc[q_idx] <= doc[kv_idx]", lambda e: e["doc"][e["q"]] <= e["doc"][e["k"]]),
            node("docb[b, q_idx] != docb[b, kv_idx]", lambda e: e["docb"][e["b"], e["q"]] != e["docb"][e["b"], e["k"]]),
            node("doc[clamp(q_idx + kv_len - q_len, 0, kv_len - 1)] == doc[kv_idx]",
                 lambda e: e["doc"][torch.clamp(e["q"] + e["Skv"] - e["Sq"], 0, e["Skv"] - 1)] == e["doc"][e["k"]]),
            node("fb[kv_idx] > 0.0", lambda e: e["fb"][e["k"]] > 0.0),
            node("fb[q_idx] != fb[kv_idx]", lambda e: e["fb"][e["q"]] != e["fb"][e["k"]]),
            node("fb[kv_idx] + float(q_idx) > float(kv_idx)", lambda e: e["fb"][e["k"]] + e["q"] > e["k"]),
            node("(kv_idx & 3) == 1", lambda e: (e["k"] & 3) == 1),
            node("kv_idx <= q_idx + h", lambda e: e["k"] <= e["q"] + e["h"]),
            node("bits[kv_idx]", lambda e: e["bits"][e["k"]]),
            node("sum(int(kv_idx == q_idx + i) for i in range(3)) > 0",
                 lambda e: sum((e["k"] == e["q"] + i).long() for i in range(3)) > 0),
            node("False", lambda e: torch.tensor(False)),
        ]),
        st.tuples(st.integers(-3, 5), st.integers(1, 300)).map(lambda t: node(
            f"{t[0]} <= q_idx - kv_idx < {t[0] + t[1]}",
            lambda e, lo=t[0], w=t[1]: (lo <= e["q"] - e["k"]) & (e["q"] - e["k"] < lo + w))),
        st.integers(1, 70).map(lambda c: node(f"q_idx // {c} >= kv_idx // {c}",
                                              lambda e, c=c: _floor(e["q"], c) >= _floor(e["k"], c))),
        st.integers(2, 9).map(lambda c: node(f"(q_idx - kv_idx) % {c} == 0",
                                             lambda e, c=c: torch.remainder(e["q"] - e["k"], c) == 0)),
        st.integers(1, 4).map(lambda K: node(f"any(topk[h, q_idx // 16, i] == kv_idx // 16 for i in range({K}))",
                                             lambda e, K=K: topk(e, K))),
    )


_SPARSITY_MASKS = st.recursive(_atoms(), lambda inner: st.one_of(
    st.tuples(inner, inner).map(lambda t: node(f"({t[0][0]}) & ({t[1][0]})", lambda e, a=t[0][1], b=t[1][1]:
                                               a(e) & b(e))),
    st.tuples(inner, inner).map(lambda t: node(f"({t[0][0]}) | ({t[1][0]})", lambda e, a=t[0][1], b=t[1][1]:
                                               a(e) | b(e))),
    inner.map(lambda a: node(f"~({a[0]})", lambda e, f=a[1]: ~f(e))),
    st.tuples(inner, inner, inner).map(lambda t: node(f"where({t[0][0]}, {t[1][0]}, {t[2][0]})",
                                                      lambda e, c=t[0][1], a=t[1][1], b=t[2][1]:
                                                      torch.where(c(e), a(e), b(e))))), max_leaves=4)


@settings(_FUZZ, max_examples=40)
@given(_SPARSITY_MASKS, st.integers(1, 300), st.data())
def test_block_sparsity_is_sound_against_the_dense_mask(mask, kv_len, data):
    q_len = data.draw(st.sampled_from([kv_len, 1, data.draw(st.integers(1, 300))]))
    bq = data.draw(st.sampled_from([1, 2, 3, 7, 16, 31, 64, 100, 128, 129, 200, 256]))
    bk = data.draw(st.sampled_from([bq, 1, 5, 16, 33, 128, 256]))
    B, H, prefix = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(0, 310))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 20)))
    S = max(q_len, kv_len)
    int_dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8]))
    doc = torch.randint(0, data.draw(st.sampled_from([1, 5, 100])), (S,), generator=g)
    if data.draw(st.booleans()):
        doc = doc.sort().values
    fb = torch.randn(S, generator=g, dtype=torch.float64)
    special = torch.rand(S, generator=g) < 0.3
    fb[special] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[
        torch.randint(0, 3, (int(special.sum()),), generator=g)]
    tensors = {"doc": doc.to(int_dtype), "docb": torch.randint(0, 4, (B, S), generator=g).sort(-1).values,
               "pre": torch.randint(0, S + 1, (B,), generator=g),
               "topk": torch.randint(0, -(-S // 16), (H, -(-S // 16), 4), generator=g).to(torch.int32),
               "fb": fb.to(data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))),
               "bits": torch.rand(S, generator=g) < 0.5}
    var = al.compile(mask=mask[0], params={"prefix": prefix} if "prefix" in mask[0] else {})
    given_t = {n: t for n, t in tensors.items() if n in var.tensor_names}
    bs = var.block_sparsity(q_len, kv_len, B, H, (bq, bk), refine=data.draw(st.booleans()), **given_t)
    env = {"b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1),
           "q": torch.arange(q_len).view(1, 1, q_len, 1), "k": torch.arange(kv_len).view(1, 1, 1, kv_len),
           "Sq": q_len, "Skv": kv_len, "prefix": prefix,
           **{n: (t if t.dtype in (torch.bool, torch.float64) else t.float() if t.is_floating_point() else t.long())
              for n, t in tensors.items()}}
    dense = torch.broadcast_to(mask[1](env), (B, H, q_len, kv_len))
    Qb, Kb = -(-q_len // bq), -(-kv_len // bk)
    pad = torch.full((B, H, Qb * bq, Kb * bk), -1, dtype=torch.int8)
    pad[:, :, :q_len, :kv_len] = dense.to(torch.int8)
    tiles = pad.view(B, H, Qb, bq, Kb, bk).permute(0, 1, 2, 4, 3, 5).reshape(B, H, Qb, Kb, -1)
    kind = bs.kind.expand(B, H, Qb, Kb)
    assert not ((kind == 0) & (tiles == 1).any(-1)).any(), f"a block marked empty holds an allowed pair: {mask[0]}"
    assert not ((kind == 2) & (tiles == 0).any(-1)).any(), f"a block marked full holds a masked pair: {mask[0]}"


_SPECIAL = [math.inf, -math.inf, math.nan, 1e38, -1e38, 3e38, 1e-45, 0.0, -0.0, 65504.0, 1e5]
# score templates: (text, closure (s, env) -> float64 scores, params); a "shift" is a row term the reference adds
# to lse instead of the scores (float64 would round s - 3e38 to one value where attnlang drops the term exactly)
_EXTREME_SCORES = [
    ("score", lambda s, e: s, {}),
    ("cap * tanh(score / cap)", lambda s, e: e["cap"] * torch.tanh(s / e["cap"]), {"cap": None}),
    ("score + bias[h]", lambda s, e: s + e["bias"][e["h"]], {}),
    ("score + bias[q_idx]", lambda s, e: s + e["bias"][e["q"]], {}),
    ("score + bias[kv_idx]", lambda s, e: s + e["bias"][e["k"]], {}),
    ("score * big", lambda s, e: s * e["big"], {"big": None}),
    ("score + big * float(q_idx)", lambda s, e: s, {"big": None, "shift": lambda e: e["big"] * e["q"].double()}),
    ("score - big", lambda s, e: s, {"big": None, "shift": lambda e: -e["big"] + 0.0 * e["q"]}),
    ("where(bias[kv_idx] > 0.0, score, -inf)", lambda s, e: torch.where(e["bias"][e["k"]] > 0, s, -math.inf), {}),
    ("max(score, bias[kv_idx])", lambda s, e: torch.maximum(s, e["bias"][e["k"]]), {}),
    ("clamp(score + bias[kv_idx], -5.0, 5.0)", lambda s, e: torch.clamp(s + e["bias"][e["k"]], -5.0, 5.0), {}),
    ("exp(score)", lambda s, e: torch.exp(s), {}),
    ("log(abs(score))", lambda s, e: torch.log(torch.abs(s)), {}),
]
_EXTREME_MASKS = [
    ("True", lambda e: torch.tensor(True)),
    ("kv_idx <= q_idx + kv_len - q_len", lambda e: e["k"] <= e["q"] + e["Skv"] - e["Sq"]),
    ("mb[kv_idx] > 0.0", lambda e: e["mb"][e["k"]] > 0.0),
    ("mb[kv_idx] != 0.5", lambda e: e["mb"][e["k"]] != 0.5),
    ("q_idx < kv_idx - 1000", lambda e: e["q"] < e["k"] - 1000),
]


@settings(_FUZZ, max_examples=10)
@given(st.sampled_from(_EXTREME_SCORES), st.sampled_from(_EXTREME_MASKS),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       st.sampled_from([1.0, 300.0, 1e4, 1e-20]), st.sampled_from([None, 1e-30, 1e4, 1e20, -1.0, 0.0]),
       st.sampled_from([1e-45, 1e-30, 0.02, 1e30]), st.sampled_from([1e3, 1e30, 3e38, 1e300]),
       st.lists(st.sampled_from(_SPECIAL), max_size=3), st.lists(st.sampled_from([math.nan, math.inf, 0.5]),
                                                                  max_size=2),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), st.sampled_from([(1, 4), (9, 1), (3, 9)]),
       st.sampled_from([1, 64]), st.sampled_from(["eager", "flex"]), st.integers(0, 2 ** 20))
def test_numerical_extremes_match_float64_or_raise(score, mask, dtype, mag, scale, cap, big, bias_special,
                                                    mb_special, bias_dtype, lengths, D, backend, seed):
    """Overflowing scores, huge and tiny scale=, softcaps with tiny caps, rows left empty, NaN / inf inside named
    tensors: the float64 reference within tolerance, or an AttnLangError; never NaN."""
    g = torch.Generator().manual_seed(seed)
    (Sq, Skv), H = lengths, 2
    q, k = ((torch.randn(1, H, n, D, generator=g, dtype=torch.float64) * mag).to(dtype) for n in (Sq, Skv))
    v = torch.randn(1, H, Skv, D, generator=g, dtype=torch.float64).to(dtype)
    n = max(Sq, Skv, H)
    bias, mb = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g)
    for t, values in ((bias, bias_special), (mb, mb_special)):
        for x in values:
            t[int(torch.randint(0, n, (1,), generator=g))] = x
    bias = bias.to(bias_dtype)
    params = {p: {"cap": cap, "big": big}[p] for p in score[2] if p != "shift"}
    try:
        var = al.compile(score[0], mask[0], params=params)
    except al.AttnLangError:
        return
    tensors = {n: t for n, t in {"bias": bias, "mb": mb}.items() if n in var.tensor_names}
    scale_ = 1 / math.sqrt(D) if scale is None else scale
    s = q.double() @ k.double().transpose(-1, -2) * scale_
    try:
        out, lse = var(q, k, v, backend=backend, scale=scale, return_lse=True, **tensors)
    except al.AttnLangError:
        return
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    e = {"h": torch.arange(H).view(1, H, 1, 1), "q": torch.arange(Sq).view(1, 1, Sq, 1),
         "k": torch.arange(Skv).view(1, 1, 1, Skv), "Sq": Sq, "Skv": Skv, "bias": bias.double(), "mb": mb.double(),
         **params}
    scores = torch.broadcast_to(score[1](s, e), (1, H, Sq, Skv))
    allowed = torch.broadcast_to(mask[1](e), (1, H, Sq, Skv))
    assert not ((torch.isnan(scores) | (scores == math.inf)) & allowed).any(), "a NaN / +inf score was not refused"
    want_out, want_lse = _dense_reference(scores, allowed, v.double(), 1)
    if "shift" in score[2]:
        want_lse = want_lse + score[2]["shift"](e)[..., 0]
    (atol, rtol), _ = alt.TOLERANCES[dtype]
    alt._compare("out", out, want_out, atol, rtol, f"{score[0]!r} {mask[0]!r}")
    if dtype != torch.float64:
        assume(not (want_lse.isfinite() & (want_lse.abs() > 3.4e38)).any())  # refused above, or lse is inf
    alt._compare("lse", lse, want_lse, max(atol, 2e-4), max(rtol, 2e-4), f"{score[0]!r} {mask[0]!r}")


@settings(_FUZZ, max_examples=2)
@given(alt.variants(max_depth=3, sinks=True, unnormalized=True),
       alt.shapes(lengths=(1, 3, 127, 129), head_dims=(1, 3, 16), max_batch=3, max_group=8),
       st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), st.integers(0, 2 ** 31 - 1))
def test_the_testing_helpers_pass_on_random_variants_and_shapes(var, shape, dtype, seed):
    """attnlang.testing's own pipeline (variants, shapes, make_qkv, tensors_for, assert_backends_agree) neither
    crashes nor reports a difference on what it generates: flex vs eager, and eager's gradients vs themselves."""
    q, k, v = alt.make_qkv(shape, dtype=dtype, seed=seed)
    tensors = alt.tensors_for(var, shape.batch, shape.q_heads, shape.q_len, shape.kv_len, seed=seed,
                              float_dtype=dtype)
    assert alt.assert_backends_agree(var, q, k, v, **tensors)[:2] == ("out", "lse")
    assert "grad q" in alt.assert_backends_agree(var, q, k, v, backend="eager", grads=True, **tensors)


class _Calls(torch.nn.Module):
    def __init__(self, var, tensors, backend):
        super().__init__()
        self.var, self.backend, self.names = var, backend, sorted(tensors)
        for n, t in tensors.items():
            if t.is_floating_point():
                self.register_parameter(n, torch.nn.Parameter(t.clone()))
            else:
                self.register_buffer(n, t.clone())

    def forward(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] in: views inside the graph
        return self.var(q, k, v, backend=self.backend, return_lse=True, **{n: getattr(self, n) for n in self.names})


@settings(_FUZZ, max_examples=1)
@given(alt.variants(max_depth=2, sinks=True, unnormalized=True),
       alt.shapes(lengths=(1, 3, 7), head_dims=(4,), max_group=2), st.sampled_from(["eager", "flex"]))
def test_compiled_module_calling_a_random_variant_equals_uncompiled(var, shape, backend):
    """torch.compile(fullgraph=True) of a module around a random variant: one graph, no break, the same out / lse
    and (eager; flex has no CPU backward) the same gradients, q / k / v and the module's float tensors."""
    tensors = alt.tensors_for(var, shape.batch, shape.q_heads, shape.q_len, shape.kv_len, seed=1)
    grads = backend == "eager"
    q, k, v = (t.transpose(1, 2).contiguous().requires_grad_(grads) for t in alt.make_qkv(shape, seed=2))
    module = _Calls(var, tensors, backend)

    def step(fn):
        with torch.set_grad_enabled(grads):
            out, lse = fn(q, k, v)
            if grads:
                (out.square().sum() + torch.where(lse.isfinite(), lse, 0.0).sum()).backward()
        got = [out.detach(), lse.detach()]
        if grads:
            for t in (q, k, v, *module.parameters()):
                got.append(t.grad)
                t.grad = None
        return got
    want = step(module)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(module)(q, k, v)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        got = step(torch.compile(module, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            alt._compare("compiled", a, b, 1e-5, 1e-5, f"{var!r} {shape} {backend}")
