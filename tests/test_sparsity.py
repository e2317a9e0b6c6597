"""Block sparsity: soundness and exactness against brute force on lengths that do not divide the blocks."""

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import attnlang as al
from attnlang.ast import names_used
from attnlang.lower_torch import evaluate
from attnlang.sparsity import BlockSparsity, block_sparsity, known_exact

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

SHAPES = [(97, 97, (16, 32)), (45, 67, (7, 5)), (130, 130, (16, 16)), (33, 20, (8, 8))]


def brute_kind(bs: BlockSparsity, batch: int, heads: int, float_dtype=torch.float32) -> torch.Tensor:
    """The true kind of every block, from the mask on every position (int8 [B, H, Qb, Kb])."""
    q, k = bs.q_len, bs.kv_len
    B, H = bs.kind.shape[:2]
    names = {"b": torch.arange(B).view(-1, 1, 1, 1), "h": torch.arange(H).view(1, -1, 1, 1),
             "q_idx": torch.arange(q).view(1, 1, -1, 1), "kv_idx": torch.arange(k).view(1, 1, 1, -1),
             "q_len": torch.tensor(q), "kv_len": torch.tensor(k)}
    used = names_used(bs.mask)
    val = evaluate(bs.mask, {n: t for n, t in names.items() if n in used}, bs.tensors, float_dtype)
    val = val.expand(B, H, q, k)
    bq, bk = bs.block_size
    Qb, Kb = -(-q // bq), -(-k // bk)
    pad = torch.full((B, H, Qb * bq, Kb * bk), -1, dtype=torch.int8)
    pad[:, :, :q, :k] = val.to(torch.int8)
    tiles = pad.view(B, H, Qb, bq, Kb, bk).permute(0, 1, 2, 4, 3, 5).reshape(B, H, Qb, Kb, -1)
    full = (tiles != 0).all(-1)
    some = (tiles == 1).any(-1)
    return full.to(torch.int8) + some.to(torch.int8)


def assert_sound(bs, truth):
    kind = bs.kind.expand_as(truth)
    wrong_empty = (kind == 0) & (truth != 0)
    wrong_full = (kind == 2) & (truth != 2)
    assert not bool(wrong_empty.any()), f"block called empty holds an allowed pair: {wrong_empty.nonzero()[:3]}"
    assert not bool(wrong_full.any()), f"block called full holds a masked pair: {wrong_full.nonzero()[:3]}"


# ---- a strategy for random masks ----

def _ints(depth):
    leaves = st.sampled_from(["q_idx", "kv_idx", "b", "h", "q_len", "kv_len", "doc[q_idx]", "doc[kv_idx]"]) | \
        st.integers(-40, 140).map(str)
    if depth == 0:
        return leaves
    sub = _ints(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(sub, st.sampled_from(["+", "-", "*"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["//", "%"]), st.integers(1, 40)).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["//", "%"]), st.integers(-9, -1)).map(
            lambda t: f"({t[0]} {t[1]} ({t[2]}))"),
        sub.map(lambda a: f"abs({a})"),
        st.tuples(st.sampled_from(["min", "max"]), sub, sub).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(_bools_leaf(), sub, sub).map(lambda t: f"where({t[0]}, {t[1]}, {t[2]})"),
        sub.map(lambda a: f"int(float({a}) * 0.5)"),
        sub.map(lambda a: f"doc[clamp({a}, 0, 129)]"),
    )


def _bools_leaf():
    cmp = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
    lin = st.sampled_from(["q_idx", "kv_idx", "q_idx - kv_idx", "kv_idx - q_idx", "doc[q_idx]", "h", "b"])
    return st.tuples(lin, cmp, st.integers(-5, 100)).map(lambda t: f"({t[0]} {t[1]} {t[2]})")


def masks(depth=2):
    cmp = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
    comparison = st.tuples(_ints(depth), cmp, _ints(depth)).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
    chained = st.tuples(_ints(1), st.sampled_from(["<", "<="]), _ints(1), st.sampled_from(["<", "<="]),
                        _ints(1)).map(lambda t: " ".join(t))
    float_cmp = st.tuples(_ints(1), cmp, st.floats(-50, 150, allow_nan=False)).map(
        lambda t: f"float({t[0]}) * 0.3 {t[1]} {t[2]!r}")
    leaf = st.one_of(comparison, chained, float_cmp, st.sampled_from(["True", "False", "bits[q_idx]"]))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["&", "|"]), inner).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})"),
        inner.map(lambda a: f"~({a})"),
        st.tuples(_bools_leaf(), inner, inner).map(lambda t: f"where({t[0]}, {t[1]}, {t[2]})")),
        max_leaves=4)


def _tensors(mask_text: str, sorted_doc: bool):
    gen = torch.Generator().manual_seed(len(mask_text))
    doc = torch.randint(0, 4, (130,), generator=gen)
    if sorted_doc:
        doc = torch.sort(doc)[0]
    bits = torch.rand(130, generator=gen) < 0.7
    out = {}
    if "doc[" in mask_text:
        out["doc"] = doc
    if "bits[" in mask_text:
        out["bits"] = bits
    return out


def _compile(text):
    try:
        return al.compile(mask=text)
    except al.AttnLangError:
        return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mask=masks(), shape=st.sampled_from(SHAPES), sorted_doc=st.booleans(), refine=st.booleans())
def test_sound_on_random_masks(mask, shape, sorted_doc, refine):
    v = _compile(mask)
    event("compiled" if v is not None else "rejected by the checker")
    if v is None:
        return
    q, k, block = shape
    tensors = {n: t for n, t in _tensors(mask, sorted_doc).items() if n in v.tensor_names}
    try:
        bs = block_sparsity(v, q, k, batch=2, heads=3, block_size=block, refine=refine, **tensors)
    except al.AttnLangError:
        event("index out of range")
        return  # an index that can leave its tensor for these lengths: rejected, as at call time
    event(f"partial blocks: {'some' if int((bs.kind == 1).sum()) else 'none'}")
    truth = brute_kind(bs, 2, 3)
    assert_sound(bs, truth)
    if refine:  # small shapes always fit the refinement budget: refinement makes every block exact
        has_float = "float(" in mask
        if not has_float:
            assert torch.equal(bs.kind.expand_as(truth), truth)


AFFINE_FORMS = ["q_idx", "kv_idx", "q_idx - kv_idx", "kv_idx - q_idx", "q_idx + kv_idx", "2 * q_idx - 3 * kv_idx",
                "q_idx - kv_idx + kv_len - q_len", "kv_idx - 2 * q_idx + h", "q_idx - kv_idx - b"]


@settings(max_examples=150, deadline=None)
@given(form=st.sampled_from(AFFINE_FORMS), op=st.sampled_from(["<", "<=", ">", ">="]), c=st.integers(-60, 160),
       shape=st.sampled_from(SHAPES))
def test_exact_single_affine_comparison(form, op, c, shape):
    v = al.compile(mask=f"{form} {op} {c}")
    assert known_exact(v.simplified.mask)
    q, k, block = shape
    bs = block_sparsity(v, q, k, batch=2, heads=3, block_size=block, refine=False)
    assert torch.equal(bs.kind.expand_as(brute_kind(bs, 2, 3)), brute_kind(bs, 2, 3))


@settings(max_examples=150, deadline=None)
@given(lo=st.integers(-80, 80), width=st.integers(0, 120), strict=st.booleans(), shape=st.sampled_from(SHAPES),
       flip=st.booleans(), extra=st.sampled_from(["", " & q_idx - kv_idx != 7", " & ~(q_idx - kv_idx > 50)"]))
def test_exact_chained_affine(lo, width, strict, shape, flip, extra):
    cmp = "<" if strict else "<="
    form = "kv_idx - q_idx" if flip else "q_idx - kv_idx"
    v = al.compile(mask=f"{lo} {cmp} {form} <= {lo + width}{extra}")
    q, k, block = shape
    bs = block_sparsity(v, q, k, block_size=block, refine=False)
    truth = brute_kind(bs, 1, 1)
    if known_exact(v.simplified.mask):
        assert torch.equal(bs.kind, truth)
    else:
        assert_sound(bs, truth)


@pytest.mark.parametrize("mask", ["q_idx // 16 == kv_idx // 16", "(q_idx - kv_idx) % 3 == 0",
                                  "q_idx % 10 < 5 & kv_idx // 7 != 2", "q_idx >= kv_idx | kv_idx < 20",
                                  "q_idx >= kv_idx & q_idx + kv_idx >= 60", "abs(q_idx - kv_idx) <= 9"])
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_after_refinement(mask, shape):
    v = al.compile(mask=mask)
    q, k, block = shape
    bs = block_sparsity(v, q, k, block_size=block)
    assert torch.equal(bs.kind, brute_kind(bs, 1, 1))


def test_causal_blocks_and_density():
    v = al.compile(mask="q_idx >= kv_idx")
    bs = block_sparsity(v, 97, 97, block_size=(16, 32))
    assert bs.kind.shape == (1, 1, 7, 4) and bs.kind.dtype == torch.int8
    truth = brute_kind(bs, 1, 1)
    assert torch.equal(bs.kind, truth)
    # density counts the real pairs of non-empty blocks, ragged edges included
    qs = [min(16, 97 - 16 * i) for i in range(7)]
    ks = [min(32, 97 - 32 * j) for j in range(4)]
    pairs = sum(qs[i] * ks[j] for i in range(7) for j in range(4) if truth[0, 0, i, j] != 0)
    assert math.isclose(bs.density, pairs / (97 * 97))


def test_batch_and_heads_dimensions():
    v = al.compile(mask="h < 2 & q_idx >= kv_idx")
    bs = block_sparsity(v, 64, 64, batch=3, heads=4, block_size=16)
    assert bs.kind.shape == (1, 4, 4, 4)
    assert int(bs.kind[0, 2:].max()) == 0
    v = al.compile(mask="kv_idx < prefix[b]")
    prefix = torch.tensor([10, 64, 0])
    bs = block_sparsity(v, 64, 64, batch=3, block_size=16, prefix=prefix)
    assert bs.kind.shape == (3, 1, 4, 4)
    assert torch.equal(bs.kind, brute_kind(bs, 3, 1))
    assert int(bs.kind[2].max()) == 0 and int(bs.kind[1].min()) == 2


def test_document_mask_uses_block_summaries():
    doc = torch.arange(1000) // 250
    v = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    bs = block_sparsity(v, 1000, 1000, block_size=(50, 50), refine=False, doc=doc)
    assert torch.equal(bs.kind, brute_kind(bs, 1, 1))
    assert bs.counts()["partial"] == 0


def test_tensor_read_indexed_by_offset_and_two_axes():
    bias = torch.randn(3, 200)
    v = al.compile(mask="bias[h, kv_idx] > 0.5 | bias[h, clamp(q_idx - kv_idx + 100, 0, 199)] < -1.0")
    bs = block_sparsity(v, 100, 100, heads=3, block_size=(9, 11), refine=False, bias=bias)
    assert_sound(bs, brute_kind(bs, 1, 3))


def test_nan_and_inf_are_handled_soundly():
    vals = torch.tensor([0.0, float("nan"), 1.0, float("inf"), -float("inf")] * 20)
    for mask in ["vals[kv_idx] <= inf", "vals[kv_idx] == vals[kv_idx]", "vals[kv_idx] != vals[kv_idx]",
                 "exp(float(q_idx)) * 0.0 == 0.0", "exp(float(kv_idx)) - exp(float(kv_idx)) <= 0.0",
                 "log(float(kv_idx)) - log(float(kv_idx)) <= 0.0", "float(q_idx) / float(kv_idx) < inf"]:
        v = al.compile(mask=mask)
        kw = {"vals": vals} if "vals" in mask else {}
        for refine in (False, True):
            bs = block_sparsity(v, 100, 100, block_size=(10, 10), refine=refine, **kw)
            assert_sound(bs, brute_kind(bs, 1, 1))


def test_float_rounding_margin():
    # float32 rounds 0.1 * q differently from float64; blocks at the boundary must not be claimed
    v = al.compile(mask="float(q_idx) * 0.1 < float(kv_idx) * 0.1 + 0.30000001")
    bs = block_sparsity(v, 130, 130, block_size=(16, 16), refine=False)
    assert_sound(bs, brute_kind(bs, 1, 1, torch.float32))
    assert_sound(bs, brute_kind(bs, 1, 1, torch.float64))


def test_lifted_mask_from_score():
    v = al.compile(score="where(q_idx >= kv_idx, score, -inf)")
    bs = block_sparsity(v, 64, 64, block_size=16)
    assert bs.counts() == {"empty": 6, "partial": 4, "full": 6}


def test_deep_mask_does_not_recurse():
    mask = " & ".join(f"kv_idx != {i}" for i in range(95))
    v = al.compile(mask=mask)
    bs = block_sparsity(v, 400, 400, block_size=64)
    assert torch.equal(bs.kind, brute_kind(bs, 1, 1))


def test_large_lengths_are_cheap():
    v = al.compile(mask="0 <= q_idx - kv_idx < 1024")
    bs = block_sparsity(v, 1 << 18, 1 << 18)
    assert bs.kind.shape == (1, 1, 2048, 2048)
    assert bs.counts()["partial"] == 2048 + 2040  # the diagonal and the window's far edge


@pytest.mark.parametrize("bad", [dict(q_len=-1, kv_len=4), dict(q_len=4, kv_len=4, block_size=(0, 4)),
                                 dict(q_len=4, kv_len=4, block_size="x"), dict(q_len=4.5, kv_len=4)])
def test_bad_arguments(bad):
    v = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(al.AttnLangError):
        block_sparsity(v, **bad)


@pytest.mark.parametrize("q_len, kv_len", [(0, 300), (300, 0), (0, 0)])
def test_a_length_of_0_gives_no_blocks_along_it(q_len, kv_len):
    v = al.compile(mask="doc[b, q_idx] == doc[b, kv_idx] & q_idx >= kv_idx")
    doc = torch.zeros(3, max(q_len, kv_len), dtype=torch.int64)
    bs = v.block_sparsity(q_len=q_len, kv_len=kv_len, batch=3, block_size=128, doc=doc)
    assert bs.kind.shape == (3, 1, -(-q_len // 128), -(-kv_len // 128)) and bs.kind.dtype == torch.int8
    assert (bs.q_len, bs.kv_len, bs.block_size) == (q_len, kv_len, (128, 128))
    assert bs.density == 0.0 and bs.counts() == {"empty": 0, "partial": 0, "full": 0} and "density" in bs.summary()
    assert bs.to_flex().shape[-2:] == (q_len, kv_len)


def test_a_length_of_0_still_checks_the_reads_along_the_other():
    v = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    with pytest.raises(al.AttnLangError, match="index 0 of 'doc'"):  # doc[kv_idx] of 299 for kv_len 300
        v.block_sparsity(q_len=0, kv_len=300, doc=torch.zeros(299, dtype=torch.int64))


def test_bad_tensors():
    v = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    with pytest.raises(al.AttnLangError, match="doc"):
        block_sparsity(v, 8, 8)
    with pytest.raises(al.AttnLangError, match="index 0"):
        block_sparsity(v, 8, 8, doc=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(al.AttnLangError, match="other"):
        block_sparsity(v, 8, 8, doc=torch.zeros(8, dtype=torch.int64), other=torch.zeros(3))


def test_variant_method_delegates():
    v = al.compile(mask="q_idx >= kv_idx")
    bs = v.block_sparsity(q_len=256, kv_len=256)
    assert bs.kind.shape == (1, 1, 2, 2) and bs.block_size == (128, 128)


@pytest.mark.parametrize("mask,tensors", [
    ("q_idx >= kv_idx", {}),
    ("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": torch.sort(torch.randint(0, 3, (200,)))[0]}),
    ("h < 1 | 0 <= q_idx - kv_idx < 40", {}),
])
def test_to_flex_matches_eager(mask, tensors):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    torch.manual_seed(0)
    v = al.compile(mask=mask)
    B, H, S, D = 2, 2, 200, 16
    q, k, val = (torch.randn(B, H, S, D) for _ in range(3))
    bs = block_sparsity(v, S, S, batch=B, heads=H, **tensors)
    bm = bs.to_flex()
    assert isinstance(bm, BlockMask)
    out = flex_attention(q, k, val, block_mask=bm)
    ref = v(q, k, val, backend="eager", **tensors)
    assert (out - ref).abs().max() < 1e-5


def test_to_fa4_without_flash_attn():
    try:
        import flash_attn.cute  # noqa: F401
        pytest.skip("flash_attn is installed")
    except ImportError:
        pass
    bs = block_sparsity(al.compile(mask="q_idx >= kv_idx"), 256, 256)
    with pytest.raises(al.AttnLangError, match="flash"):
        bs.to_fa4()


def test_to_fa4_layout_forward_and_transposed(monkeypatch):
    # flash_attn.cute's BlockSparseTensorsTorch is a NamedTuple; a stand-in with its fields checks the layout here
    import collections
    import sys
    import types
    fields = ["mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx", "block_size"]
    module = types.ModuleType("flash_attn.cute.block_sparsity")
    module.BlockSparseTensorsTorch = collections.namedtuple("BlockSparseTensorsTorch", fields)
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", module)
    bs = block_sparsity(al.compile(mask="q_idx >= kv_idx"), 300, 300, block_size=(128, 128))
    fwd, bwd = bs.to_fa4(), bs.to_fa4(transpose=True)
    # causal, 3 x 3 blocks: row i has full blocks 0..i-1 and the partial diagonal block i
    assert fwd.mask_block_cnt.tolist() == [[[1, 1, 1]]] and fwd.full_block_cnt.tolist() == [[[0, 1, 2]]]
    assert fwd.mask_block_idx[0, 0, :, 0].tolist() == [0, 1, 2]
    assert fwd.full_block_idx[0, 0, 2, :2].tolist() == [0, 1]
    # per kv block j: full q blocks j+1.. and the partial diagonal j
    assert bwd.full_block_cnt.tolist() == [[[2, 1, 0]]]
    assert bwd.full_block_idx[0, 0, 0, :2].tolist() == [1, 2]
    assert fwd.mask_block_idx.dtype == torch.int32 and fwd.block_size == (128, 128)


def test_float_cancellation_margin():
    # float32 error of q * 0.1 at q ~ 1e5 is ~0.004: a margin relative to the difference alone would be too small
    v = al.compile(mask="float(q_idx) * 0.1 - float(kv_idx) * 0.1 < 0.05")
    bs = block_sparsity(v, 4096, 4096, block_size=(64, 64), refine=False)
    assert_sound(bs, brute_kind(bs, 1, 1, torch.float32))
    assert_sound(bs, brute_kind(bs, 1, 1, torch.float64))


@pytest.mark.gpu
def test_to_flex_on_cuda():
    from torch.nn.attention.flex_attention import flex_attention
    torch.manual_seed(0)
    dev = torch.device("cuda")
    doc = torch.sort(torch.randint(0, 3, (300,), device=dev))[0]
    v = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    q, k, val = (torch.randn(1, 2, 300, 64, device=dev) for _ in range(3))
    bs = block_sparsity(v, 300, 300, doc=doc)
    assert bs.kind.device.type == "cuda"
    out = flex_attention(q, k, val, block_mask=bs.to_flex())
    torch.testing.assert_close(out, v(q, k, val, backend="eager", doc=doc), atol=2e-5, rtol=1e-4)
    bm = block_sparsity(al.compile(mask="q_idx >= kv_idx"), 300, 300).to_flex(device=dev)
    assert bm.kv_num_blocks.device.type == "cuda"


def test_huge_coefficients_stay_sound():
    for mask in ["q_idx * 4611686018427387904 < kv_idx", "q_idx * 9007199254740993 - kv_idx * 9007199254740993 >= 0",
                 "q_idx + 9223372036854775000 > kv_idx"]:
        v = al.compile(mask=mask)
        try:
            bs = block_sparsity(v, 40, 40, block_size=(8, 8), refine=False)
        except al.AttnLangError as e:  # the checker refuses integers that can leave 64 bits, as at call time
            assert "64 bits" in str(e)
            continue
        assert_sound(bs, brute_kind(bs, 1, 1))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=12), block=st.sampled_from([(16, 16), (7, 5)]),
       mask=st.sampled_from(["doc[q_idx] == doc[kv_idx]", "doc[q_idx] != doc[kv_idx]",
                             "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", "doc[kv_idx] == doc[q_idx]",
                             "doc[b, q_idx] == doc[b, kv_idx]", "doc[q_idx] == 2",
                             "doc[clamp(q_idx + 3, 0, q_len - 1)] == doc[kv_idx]", "doc[q_idx] == doc[q_idx // 2]"]),
       shuffle=st.booleans())
def test_unaligned_documents_need_no_refinement(lengths, block, mask, shuffle):
    """Partial blocks of doc[q_idx] == doc[kv_idx] are known partial from the per-block extremes (an extreme shared
    by both sides is a pair of the block with equal documents): the kinds stay exact without evaluating them."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    S = int(doc.numel())
    if shuffle:
        doc = doc[torch.randperm(S, generator=torch.Generator().manual_seed(S))]
    if "b," in mask:
        doc = torch.stack([doc, doc.flip(0)])
    v = al.compile(mask=mask)
    bs = block_sparsity(v, S, S, batch=2, block_size=block, doc=doc)
    truth = brute_kind(bs, 2, 1)
    assert torch.equal(bs.kind.expand_as(truth), truth)
    if mask in ("doc[q_idx] == doc[kv_idx]", "doc[q_idx] != doc[kv_idx]", "doc[kv_idx] == doc[q_idx]",
                "doc[b, q_idx] == doc[b, kv_idx]") and not shuffle:
        assert bs.refined == 0


# ---- the same soundness over bindings, bounded reductions and int bit operations (issue 20) ----

def _new_ints(depth):
    sub = _ints(max(depth - 1, 0))
    return st.one_of(
        _ints(depth),
        st.tuples(sub, st.sampled_from(["&", "|", "^"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["<<", ">>"]), st.integers(0, 4)).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["sum", "max", "min"]), sub, st.integers(1, 3)).map(
            lambda t: f"{t[0]}({t[1]} + i * 7 for i in range({t[2]}))"),
    )


def new_masks():
    cmp = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
    comparison = st.tuples(_new_ints(2), cmp, _new_ints(2)).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
    reduced = st.tuples(st.sampled_from(["any", "all"]), _new_ints(1), cmp, _new_ints(1), st.integers(0, 4)).map(
        lambda t: f"{t[0]}({t[1]} {t[2]} {t[3]} + 16 * i for i in range({t[4]}))")
    inner = st.one_of(comparison, reduced)
    joined = st.tuples(inner, st.sampled_from(["&", "|"]), inner).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})")
    # a binding read twice, and the mask around it
    rest = st.one_of(inner, joined)
    return st.tuples(_new_ints(2), cmp, st.integers(-20, 60), st.sampled_from(["&", "|"]), rest).map(
        lambda t: f"d = {t[0]}\n(d {t[1]} {t[2]} | d == {t[2]} + 3) {t[3]} ({t[4]})")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mask=new_masks(), shape=st.sampled_from(SHAPES), refine=st.booleans())
def test_sound_on_random_masks_with_bindings_reductions_and_bits(mask, shape, refine):
    v = _compile(mask)
    event("compiled" if v is not None else "rejected by the checker")
    if v is None:
        return
    q, k, block = shape
    tensors = {n: t for n, t in _tensors(mask, False).items() if n in v.tensor_names}
    try:
        bs = block_sparsity(v, q, k, batch=2, heads=3, block_size=block, refine=refine, **tensors)
    except al.AttnLangError:
        event("index out of range")
        return
    truth = brute_kind(bs, 2, 3)
    assert_sound(bs, truth)
    if refine:
        assert torch.equal(bs.kind.expand_as(truth), truth)


@pytest.mark.parametrize("mask", [
    f"(kv_idx + {2 ** 60 + 1}) % {2 ** 60} == 1 + kv_idx",        # always true; 2**60 + 1 is 2**60 in float64
    f"(kv_idx + {2 ** 60 + 1}) % {2 ** 60} != 0",
    f"(kv_idx + {2 ** 60 + 1}) % 7 == {(2 ** 60 + 1) % 7}",       # true at kv_idx = 0, 7, 14, ...
    f"(kv_idx + {2 ** 60 - 1}) // {2 ** 60} == 1",                 # false at kv_idx = 0 only
    f"max(kv_idx, {2 ** 60 + 1}) - {2 ** 60} == 1",
])
@pytest.mark.parametrize("refine", [True, False])
def test_int_operations_past_2_52_are_never_called_empty_or_full_wrongly(mask, refine):
    # the per-block bounds are float64: an int past 2**52 rounds, and % / // / - map it back to small wrong values
    # (the first three were called empty everywhere)
    v = al.compile(mask=mask)
    bs = v.block_sparsity(40, 40, 1, 1, (8, 8), refine=refine)
    dense = evaluate(v.checked.mask, {"b": torch.zeros(1, 1, 1, 1, dtype=torch.long),
                                      "h": torch.zeros(1, 1, 1, 1, dtype=torch.long),
                                      "q_idx": torch.arange(40).view(1, 1, 40, 1),
                                      "kv_idx": torch.arange(40).view(1, 1, 1, 40),
                                      "q_len": torch.tensor(40), "kv_len": torch.tensor(40)}, {}, torch.float32)
    tiles = dense.expand(1, 1, 40, 40)[0, 0].reshape(5, 8, 5, 8).permute(0, 2, 1, 3).reshape(5, 5, 64)
    kind = bs.kind[0, 0]
    assert not tiles[kind == 0].any() and tiles[kind == 2].all()
