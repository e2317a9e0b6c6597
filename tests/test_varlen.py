"""CPU tests of FA4's varlen path for packed documents (attnlang.backends.fa4_varlen): the pattern, the cu_seqlens
derivation, the global positions the emitted modifiers read, and the plumbing of route() (layouts, lse permutation,
the tile-list-forward / varlen-backward autograd function) against the eager reference, with a stand-in for
flash_attn.cute's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` that computes varlen attention in torch."""

import math

import pytest
import torch

import attnlang as al
from attnlang.check import bind
from attnlang.emit_cute import VarlenPositions, emit_module
from attnlang.patterns import documents
from attnlang.printer import to_source


def _docs(mask, params=None):
    return documents(al.compile(mask=mask, params=params).simplified.mask)


# ----- the pattern -----

@pytest.mark.parametrize("mask, tensor, batched, rest", [
    ("doc[q_idx] == doc[kv_idx]", "doc", False, "True"),
    ("doc[kv_idx] == doc[q_idx] & q_idx >= kv_idx", "doc", False, "q_idx >= kv_idx"),
    ("q_idx >= kv_idx & ids[b, q_idx] == ids[b, kv_idx]", "ids", True, "q_idx >= kv_idx"),
    ("doc[q_idx] == doc[kv_idx] & (kv_idx < 5 | q_idx >= kv_idx)", "doc", False, "q_idx >= kv_idx | kv_idx <= 4"),
    ("doc[q_idx] == doc[kv_idx] & 0 <= q_idx - kv_idx < 64", "doc", False, "q_idx <= kv_idx + 63 & q_idx >= kv_idx"),
])
def test_documents_recognised(mask, tensor, batched, rest):
    d = _docs(mask)
    assert (d.tensor, d.batched, to_source(d.rest)) == (tensor, batched, rest)
    assert "packed documents" in d.description()


@pytest.mark.parametrize("mask", ["q_idx >= kv_idx", "doc[q_idx] == doc[q_idx + 0 * kv_idx + 1]",
                                  "doc[q_idx] == other[kv_idx]", "doc[q_idx] != doc[kv_idx]",
                                  "doc[q_idx] == doc[kv_idx] | q_idx >= kv_idx", "doc[h, q_idx] == doc[h, kv_idx]",
                                  "True"])
def test_not_documents(mask):
    assert _docs(mask) is None


def test_float_ids_are_not_documents():
    from attnlang.ast import DType
    v = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    assert documents(bind(v.checked, {"doc": DType.FLOAT}).mask) is None
    assert documents(bind(v.checked, {"doc": DType.INT}).mask) is not None


def test_explain_names_the_varlen_path():
    text = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx").explain()
    assert "packed documents" in text and "varlen" in text
    assert "varlen" not in al.compile(mask="q_idx >= kv_idx").explain()


# ----- cu_seqlens -----

def _pack(doc, batch, length, batched):
    from attnlang.backends.fa4_varlen import pack_documents
    return pack_documents(doc, batch, length, batched)


def test_pack_sorted_ids():
    doc = torch.tensor([0, 0, 0, 1, 1, 4, 4, 4, 4, 9])
    p = _pack(doc, 1, 10, False)
    assert p.cu_seqlens.tolist() == [0, 3, 5, 9, 10] and p.cu_seqlens.dtype == torch.int32
    assert (p.max_seqlen, p.count, p.aligned) == (4, 4, False)


def test_pack_knows_tile_aligned_documents():
    assert _pack(torch.arange(512) // 128, 2, 512, False).aligned
    assert not _pack(torch.arange(512) // 100, 1, 512, False).aligned


def test_pack_shared_ids_repeat_per_batch_row():
    p = _pack(torch.tensor([5, 5, 6, 6, 6]), 3, 5, False)
    assert p.cu_seqlens.tolist() == [0, 2, 5, 7, 10, 12, 15]
    assert p.max_seqlen == 3


def test_pack_reads_only_the_call_length():
    p = _pack(torch.tensor([0, 0, 1, 1, 2, 2, 2]), 1, 4, False)  # the tensor may be longer than q_len
    assert p.cu_seqlens.tolist() == [0, 2, 4]


def test_pack_batched_rows():
    doc = torch.tensor([[0, 0, 1, 1, 1], [7, 8, 8, 8, 8], [3, 3, 3, 3, 3]])
    p = _pack(doc, 2, 5, True)  # only the first two rows are the call's
    assert p.cu_seqlens.tolist() == [0, 2, 5, 6, 10]
    assert p.max_seqlen == 4


@pytest.mark.parametrize("ids", [[3, 3, 2, 2, 1], [1, 1, 0, 0, 5], [True, True, False]])
def test_pack_whole_runs_in_any_order(ids):
    p = _pack(torch.tensor(ids), 1, len(ids), False)
    assert p is not None and p.cu_seqlens[-1] == len(ids)


@pytest.mark.parametrize("ids", [[0, 1, 0], [0, 0, 1, 1, 0], [2, 1, 2, 1]])
def test_pack_declines_ids_in_two_runs(ids):
    assert _pack(torch.tensor(ids), 1, len(ids), False) is None


def test_pack_declines_one_bad_batch_row():
    assert _pack(torch.tensor([[0, 0, 1], [0, 1, 0]]), 2, 3, True) is None


def test_pack_property_against_a_python_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        B = int(torch.randint(1, 4, (1,), generator=g))
        S = int(torch.randint(1, 40, (1,), generator=g))
        lens = torch.randint(1, 9, (B, S), generator=g)
        doc = torch.stack([torch.repeat_interleave(torch.arange(S), lens[b])[:S] for b in range(B)])
        p = _pack(doc, B, S, True)
        expect = []
        for b in range(B):
            row = doc[b].tolist()
            expect += [b * S + i for i in range(S) if i == 0 or row[i] != row[i - 1]]
        assert p.cu_seqlens.tolist() == expect + [B * S]
        assert p.max_seqlen == max(p.cu_seqlens[1:] - p.cu_seqlens[:-1]).item()


def test_packing_cached_per_tensor_version():
    from attnlang.backends import fa4_varlen
    doc = torch.arange(64) // 16
    q = torch.randn(1, 2, 64, 32)
    plan = al.compile(mask="doc[q_idx] == doc[kv_idx]")._plan(q, q, q, None, "eager", False, None, {"doc": doc})
    docs = fa4_varlen._documents(plan)
    a = fa4_varlen._packing(plan, docs)
    assert fa4_varlen._packing(plan, docs) is a
    doc[40:] = 9  # in place: a new version, a new packing
    b = fa4_varlen._packing(plan, docs)
    assert b is not a and b.cu_seqlens.tolist() == [0, 16, 32, 40, 64]


# ----- the emitted modifiers read global positions -----

def test_varlen_modifiers_add_the_document_start():
    v = al.compile(score="score + slope[h] * (kv_idx - q_idx) + float(b)", mask="kv_idx < 16 | q_idx >= kv_idx")
    from attnlang.ast import DType
    c = bind(v.checked, {"slope": DType.FLOAT})
    one = emit_module(None, c.mask, None, (), positions=VarlenPositions(100, 100, False)).source
    assert "_q0 = cute.full_like(kv_idx, seqlen_info.offset_q)" in one
    assert "_k0 = cute.full_like(kv_idx, seqlen_info.offset_k)" in one
    assert "operator.lt((kv_idx + _k0)" in one and "(q_idx + _q0)" in one and "_row" not in one
    many = emit_module(c.score, c.mask, None, ("slope",), positions=VarlenPositions(100, 100, True)).source
    assert "_row = _floordiv(cute.full_like(kv_idx, seqlen_info.offset_q), cute.full_like(kv_idx, 100" in many
    assert "- _row * cute.full_like(kv_idx, 100, cutlass.Int32))" in many
    assert "_row.to(cutlass.Float32)" in many  # b is the batch row, not FA4's sequence index
    plain = emit_module(c.score, c.mask, None, ("slope",)).source
    assert "offset_q" not in plain and "_q0" not in plain


def test_varlen_lengths_are_the_call_lengths():
    v = al.compile(mask="kv_idx <= q_idx + kv_len - q_len | kv_idx < 3")
    src = emit_module(None, v.checked.mask, None, (), positions=VarlenPositions(77, 77, False)).source
    assert "seqlen_info.seqlen" not in src and "cute.full_like(kv_idx, 77, cutlass.Int32)" in src


def test_varlen_prologue_only_for_names_used():
    v = al.compile(score="score * 2.0", mask="True")
    src = emit_module(v.checked.score, None, None, (), positions=VarlenPositions(8, 8, True)).source
    assert "_q0" not in src and "_row" not in src


# ----- route() against eager, with a stand-in kernel -----

def _allowed(Sq, Sk, left, right, causal):
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    off = Sk - Sq
    if causal:
        right = 0
    ok = torch.ones(Sq, Sk, dtype=torch.bool)
    if right is not None:
        ok &= j <= i + off + right
    if left is not None:
        ok &= j >= i + off - left
    return ok


def _attend(q, k, v, scale, allowed, score_mod=None):
    """q [Sq, H, D], k / v [Sk, Hk, D]; -> out [Sq, H, Dv], lse [H, Sq]; score_mod(scores [H, Sq, Sk])."""
    H, Hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if score_mod is not None:
        s = score_mod(s)
    s = s.masked_fill(~allowed, -math.inf)
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v), lse


class FakeFA4:
    """flash_attn.cute's _flash_attn_fwd / _flash_attn_bwd, in float64 torch, reading the tensors it is handed with
    whatever strides they have (so a wrong fold / unfold of the layouts gives a wrong result).

    Varlen calls attend inside each cu_seqlens sequence, head by head of the tensors given (q head i reads kv head
    i // (Hq / Hkv), as FA4 does), with FA4's window flags and, where given, a ``score_mod`` stand-in called as
    ``score_mod(score, seq, head, q_local, kv_local, offset_q, offset_k, aux)`` with FA4's indices (the sequence
    and the head of the varlen call, positions local to the sequence); dense calls (the tile-list forward) use
    ``dense_mask`` [S, S], the mask the tile lists stand for, and write into ``out=`` where given. The backward
    recomputes the forward by autograd, checks that the lse it is handed is the forward's (the layout
    permutation) and returns gradients laid out as ``torch.empty_like`` of q / k / v, as FA4 allocates them.
    ``received`` records (data_ptr, shape, stride) of the q / k / v of every varlen call."""

    def __init__(self, dense_mask=None):
        self.dense_mask = dense_mask
        self.calls = []
        self.received = []

    def _varlen(self, q, k, v, cu, scale, left, right, score_mod=None, aux=None):
        self.received.append(tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in (q, k, v)))
        outs, lses = [], []
        cu = cu.tolist()
        for seq, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            mod = None
            if score_mod is not None:
                def mod(s, a=a, seq=seq):
                    heads = torch.arange(s.shape[0])[:, None, None]
                    i, j = torch.arange(s.shape[1])[None, :, None], torch.arange(s.shape[2])[None, None, :]
                    return score_mod(s, seq, heads, i, j, a, a, aux)
            o, lse = _attend(q[a:b], k[a:b], v[a:b], scale, _allowed(b - a, b - a, left, right, False), mod)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=1)

    def _flash_attn_fwd(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                        max_seqlen_k=None, softmax_scale=None, causal=False, window_size_left=None,
                        window_size_right=None, score_mod=None, mask_mod=None, aux_tensors=None,
                        return_lse=False, block_sparse_tensors=None, out=None):
        assert mask_mod is None
        if cu_seqlens_q is not None:
            self.calls.append("fwd varlen")
            assert cu_seqlens_q.dtype == torch.int32 and q.dim() == 3
            assert int(cu_seqlens_q[-1]) == q.shape[0] == k.shape[0]
            assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
            o, lse = self._varlen(q, k, v, cu_seqlens_q, softmax_scale, window_size_left, window_size_right,
                                  score_mod, aux_tensors)
        else:
            assert score_mod is None
            self.calls.append("fwd dense")
            outs, lses = zip(*(_attend(q[b], k[b], v[b], softmax_scale, self.dense_mask) for b in range(q.shape[0])))
            o, lse = torch.stack(outs), torch.stack(lses)
        if out is not None:
            assert out.shape == o.shape
            out.copy_(o)
            o = out
        return o, (lse if return_lse else None), None, None, None

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, score_mod=None, score_mod_bwd=None, mask_mod=None,
                        aux_tensors=None, dlse=None):
        self.calls.append("bwd varlen" if cu_seqlens_q is not None else "bwd dense")
        assert cu_seqlens_q is not None and lse.shape == (q.shape[1], q.shape[0])
        assert (score_mod is None) == (score_mod_bwd is None)
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        with torch.enable_grad():
            o, l2 = self._varlen(qq, kk, vv, cu_seqlens_q, softmax_scale, window_size_left, window_size_right,
                                 score_mod, aux_tensors)
            finite = torch.isfinite(lse)
            assert torch.allclose(l2[finite], lse[finite], atol=1e-6), "lse handed to the backward is not the forward's"
            loss = (o * dout).sum() + ((l2.where(finite, 0.0) * dlse).sum() if dlse is not None else 0.0)
            grads = torch.autograd.grad(loss, (qq, kk, vv))
        return tuple(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads))


@pytest.fixture
def fake(monkeypatch):
    from attnlang.backends import fa4
    made = {}

    def install(dense_mask=None):
        made["fa"] = FakeFA4(dense_mask)
        monkeypatch.setattr(fa4, "_flash", lambda: made["fa"])
        return made["fa"]
    return install


def _doc_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _run(mask, tensors, B=2, Hq=4, Hkv=2, S=48, D=32, grads=True, options=None, params=None, seed=0, score=None,
         layout="bhsd"):
    """route() against eager on random float64 q / k / v; layout "bhsd": [B, H, S, D]-contiguous (what users
    usually pass), "bshd": [B, S, H, D]-laid-out views. Returns (out, lse, (q, k, v) as route got them, plan)."""
    from attnlang.backends import fa4_varlen
    g = torch.Generator().manual_seed(seed)

    def rand(H):
        if layout == "bshd":
            return torch.randn(B, S, H, D, dtype=torch.float64, generator=g).transpose(1, 2)
        return torch.randn(B, H, S, D, dtype=torch.float64, generator=g)
    q, k, v = rand(Hq), rand(Hkv), rand(Hkv)
    variant = al.compile(mask=mask, params=params, **({} if score is None else {"score": score}))
    qa, ka, va = (t.detach().requires_grad_(grads) for t in (q.clone(), k.clone(), v.clone()))
    if layout == "bshd":
        qa, ka, va = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(grads)
                      for t in (q, k, v))
    plan = variant._plan(qa, ka, va, None, "fa4", True, options, tensors)
    from attnlang.backends import fa4
    got = fa4_varlen.route(qa, ka, va, plan, fa4.VARLEN_HOST)
    assert got is not None
    out, lse = got
    qe, ke, ve = (t.clone().requires_grad_(grads) for t in (q, k, v))
    ref, ref_lse = variant(qe, ke, ve, backend="eager", return_lse=True, **tensors)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-6)
    if grads:
        g2 = torch.Generator().manual_seed(1)
        dout = torch.randn(out.shape, dtype=torch.float64, generator=g2)
        dlse = torch.randn(lse.shape, dtype=torch.float64, generator=g2).masked_fill(~torch.isfinite(ref_lse), 0)
        ((out * dout).sum() + (lse.where(torch.isfinite(lse), 0.0) * dlse).sum()).backward()
        ((ref * dout).sum() + (ref_lse.where(torch.isfinite(ref_lse), 0.0) * dlse).sum()).backward()
        for a, b in ((qa, qe), (ka, ke), (va, ve)):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)  # eager lse is float32
    return out, lse, (qa, ka, va), plan


LENGTHS = [5, 17, 1, 25]  # 48 positions, a document of length 1 included


def test_route_causal_documents_forward_and_backward_on_varlen(fake):
    fa = fake()
    _run("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": _doc_ids(LENGTHS)}, options={"varlen": True})
    assert fa.calls == ["fwd varlen", "bwd varlen"]


def test_route_window_inside_documents(fake):
    fake()
    _run("doc[q_idx] == doc[kv_idx] & 0 <= q_idx - kv_idx < 4", {"doc": _doc_ids(LENGTHS)},
         options={"varlen": True})


def test_route_whole_documents_no_other_mask(fake):
    fake()
    _run("doc[q_idx] == doc[kv_idx]", {"doc": _doc_ids(LENGTHS)}, options={"varlen": True}, B=1, Hkv=4)


def test_route_batched_ids(fake):
    doc = torch.stack([_doc_ids(LENGTHS), _doc_ids([30, 18])])
    fake()
    _run("doc[b, q_idx] == doc[b, kv_idx] & q_idx >= kv_idx", {"doc": doc}, options={"varlen": True})


def test_route_inference_varlen_forward(fake):
    fa = fake()
    _run("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": _doc_ids(LENGTHS)}, grads=False,
         options={"varlen": True})
    assert fa.calls == ["fwd varlen"]


def test_route_tile_list_forward_varlen_backward(fake, monkeypatch):
    """Default direction choice on a short pack: the forward on tile lists (here the stand-in's dense mask),
    the backward on varlen, the lse permuted between the layouts."""
    from attnlang.backends import fa4
    doc = _doc_ids(LENGTHS)
    dense = (doc[:, None] == doc[None, :]) & (torch.arange(48)[:, None] >= torch.arange(48)[None, :])
    fa = fake(dense)
    monkeypatch.setattr(fa4, "_load", lambda module: None)  # no CUTLASS here: the tile path's modifiers unused
    monkeypatch.setattr(fa4, "_block_sparse", lambda plan, low, device: (None, None, True))
    _run("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": doc})
    assert fa.calls == ["fwd dense", "bwd varlen"]


# ----- the folded layout: batch into heads, no copy of [B, H, S, D]-contiguous inputs -----

def _describe(mask, tensors, q, k, v, options=None, score=None):
    from attnlang.backends import fa4, fa4_varlen
    variant = al.compile(mask=mask, **({} if score is None else {"score": score}))
    plan = variant._plan(q, k, v, None, "fa4", False, options, tensors)
    return fa4_varlen.describe(q, k, v, plan, fa4.VARLEN_HOST)


def _assert_no_copy(fa, inputs, B, Hq, Hkv, S, D):
    """Every varlen call got the user's very storage, folded: [S, B * H, D] with strides (D, S * D, 1)."""
    assert fa.received
    for got in fa.received:
        for (ptr, shape, stride), t, H in zip(got, inputs, (Hq, Hkv, Hkv)):
            assert ptr == t.data_ptr(), "q / k / v were copied"
            assert shape == (S, B * H, D) and stride == (D, S * D, 1)


@pytest.mark.parametrize("B", [2, 3])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("rest", ["q_idx >= kv_idx", "0 <= q_idx - kv_idx < 4"])
def test_folded_layout_matches_eager_forward_and_backward(fake, B, Hq, Hkv, rest):
    fa = fake()
    mask = f"doc[q_idx] == doc[kv_idx] & {rest}"
    out, lse, inputs, plan = _run(mask, {"doc": _doc_ids(LENGTHS)}, B=B, Hq=Hq, Hkv=Hkv,
                                  options={"varlen": True})
    assert fa.calls == ["fwd varlen", "bwd varlen"]
    _assert_no_copy(fa, inputs, B, Hq, Hkv, 48, 32)
    assert out.shape == (B, Hq, 48, 32) and lse.shape == (B, Hq, 48)
    assert "folded batch into heads (no copy)" in _describe(mask, {"doc": _doc_ids(LENGTHS)}, *inputs,
                                                            options={"varlen": True})


def test_folded_layout_inference(fake):
    fa = fake()
    _, _, inputs, _ = _run("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": _doc_ids(LENGTHS)}, B=3,
                           grads=False, options={"varlen": True})
    assert fa.calls == ["fwd varlen"]
    _assert_no_copy(fa, inputs, 3, 4, 2, 48, 32)


def test_folded_layout_uses_one_rows_cu_seqlens(fake):
    fa = fake()
    seen = []
    real = fa._varlen
    fa._varlen = lambda q, k, v, cu, *a: seen.append(cu.tolist()) or real(q, k, v, cu, *a)
    _run("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": _doc_ids(LENGTHS)}, B=3, options={"varlen": True})
    assert seen and all(cu == [0, 5, 22, 23, 48] for cu in seen)


def test_folded_tile_list_forward_varlen_backward(fake, monkeypatch):
    """The tile-list forward writes out into a [B, H, S, Dv] buffer and hands its lse [B, H, S] on as the
    folded [B * H, S]; the varlen backward gets the saved [B, S, H, D] q / k / v folded, not copied."""
    from attnlang.backends import fa4
    doc = _doc_ids(LENGTHS)
    dense = (doc[:, None] == doc[None, :]) & (torch.arange(48)[:, None] >= torch.arange(48)[None, :])
    fa = fake(dense)
    monkeypatch.setattr(fa4, "_load", lambda module: None)
    monkeypatch.setattr(fa4, "_block_sparse", lambda plan, low, device: (None, None, True))
    _, _, inputs, _ = _run("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": doc}, B=3)
    assert fa.calls == ["fwd dense", "bwd varlen"]
    _assert_no_copy(fa, inputs, 3, 4, 2, 48, 32)


def test_packed_view_for_bshd_inputs(fake):
    """[B, S, H, D]-laid-out inputs already pack to [B * S, H, D] without a copy: that layout stays."""
    fa = fake()
    mask = "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"
    _, _, inputs, _ = _run(mask, {"doc": _doc_ids(LENGTHS)}, layout="bshd", options={"varlen": True})
    for got in fa.received:
        for (ptr, shape, _), t in zip(got, inputs):
            assert ptr == t.data_ptr() and shape[0] == 2 * 48
    assert "packed view" in _describe(mask, {"doc": _doc_ids(LENGTHS)}, *inputs, options={"varlen": True})


def test_batched_ids_keep_the_packed_layout(fake):
    fa = fake()
    doc = torch.stack([_doc_ids(LENGTHS), _doc_ids([30, 18])])
    mask = "doc[b, q_idx] == doc[b, kv_idx] & q_idx >= kv_idx"
    _, _, inputs, _ = _run(mask, {"doc": doc}, options={"varlen": True})
    assert all(shape[0] == 2 * 48 for got in fa.received for _, shape, _ in got)
    assert "one copy of q, k, v" in _describe(mask, {"doc": doc}, *inputs, options={"varlen": True})


def _slope_score_mod(S, slope):
    """What the module emitted for ``score + slope[h] * (kv_idx - q_idx)`` with global positions does, in torch
    (``slope`` baked into it as a table; the simplified score is ``score + slope[h] * kv_idx``, the row term
    going to the lse shift): the batch row from the sequence's offset in the packed rows, positions
    made global, h the kernel's head (a folded head would index past the table)."""
    def score_mod(s, seq, h, i, j, offset_q, offset_k, aux):
        row = offset_q // S
        kv = offset_k + j - row * S
        return s + slope[h] * kv
    return score_mod


def test_score_reading_h_is_not_folded(fake, monkeypatch):
    from types import SimpleNamespace

    from attnlang.backends import fa4
    fa = fake()
    slope = torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float64)
    monkeypatch.setattr(fa4, "_load", lambda module: SimpleNamespace(score_mod=_slope_score_mod(48, slope),
                                                                     score_mod_bwd=object()))
    tensors = {"doc": _doc_ids(LENGTHS), "slope": slope}
    mask, score = "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", "score + slope[h] * (kv_idx - q_idx)"
    _, _, inputs, _ = _run(mask, tensors, score=score, options={"varlen": True})
    assert all(shape[0] == 2 * 48 for got in fa.received for _, shape, _ in got)
    text = _describe(mask, tensors, *inputs, options={"varlen": True}, score=score)
    assert "one copy of q, k, v" in text and "folded" not in text


def test_score_reading_neither_b_nor_h_folds(fake, monkeypatch):
    """A score of positions only (the same for every batch row and head) runs folded (simplified: ``score +
    0.25 * kv_idx``, the row term in the lse shift)."""
    from types import SimpleNamespace

    from attnlang.backends import fa4
    fa = fake()

    def score_mod(s, seq, h, i, j, offset_q, offset_k, aux):
        return s + 0.25 * (offset_k + j)
    monkeypatch.setattr(fa4, "_load", lambda module: SimpleNamespace(score_mod=score_mod, score_mod_bwd=object()))
    mask, score = "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", "score + 0.25 * (kv_idx - q_idx)"
    _, _, inputs, _ = _run(mask, {"doc": _doc_ids(LENGTHS)}, Hkv=4, score=score, options={"varlen": True})
    _assert_no_copy(fa, inputs, 2, 4, 4, 48, 32)


def test_grouped_documents_keep_their_kv_heads_through_attention(fake):
    """fa4.attention hands the varlen path k / v as the caller passed them: the tile-list lowering's document
    mask_mod made the GUARDS "expand" row repeat them to the query heads, though the varlen kernels run no
    modifier here (no copy of k / v, and a grouped varlen backward)."""
    from attnlang.backends import fa4
    fa = fake()
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, D = 2, 4, 2, 48, 32
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, generator=g) for H in (Hq, Hkv, Hkv))
    doc = _doc_ids(LENGTHS)
    variant = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    plan = variant._plan(qa, ka, va, None, "fa4", True, {"varlen": True}, {"doc": doc})
    assert [gd.fix for gd in fa4._guards(qa, ka, va, plan, fa4.lowering(plan), True)] == ["expand"]
    out, lse = fa4.attention(qa, ka, va, plan)
    _assert_no_copy(fa, (qa, ka, va), B, Hq, Hkv, S, D)
    qe, ke, ve = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = variant(qe, ke, ve, backend="eager", doc=doc)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, (qa, ka, va), dout), torch.autograd.grad(ref, (qe, ke, ve), dout)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("score, mask, per_row", [
    ("score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", False),
    ("score + 0.5 * (kv_idx - q_idx)", "doc[q_idx] == doc[kv_idx]", False),
    ("score * slope[h]", "doc[q_idx] == doc[kv_idx]", True),
    ("score * float(b + 1)", "doc[q_idx] == doc[kv_idx]", True),
    ("score + slope[h]", "doc[q_idx] == doc[kv_idx]", False),  # a row constant: simplified away
    ("score", "doc[q_idx] == doc[kv_idx] & (h == 0 | q_idx >= kv_idx)", True),
    ("score + rel[h, clamp(q_idx - kv_idx, -8, 8) + 8]", "doc[q_idx] == doc[kv_idx]", True),
])
def test_lowering_knows_whether_the_modifiers_read_b_or_h(score, mask, per_row):
    from attnlang.backends import fa4, fa4_varlen
    q = torch.randn(2, 4, 16, 32)
    tensors = {"doc": torch.arange(16) // 4, "slope": torch.zeros(4), "rel": torch.zeros(4, 32)}
    variant = al.compile(score=score, mask=mask)
    used = {n: t for n, t in tensors.items() if n == "doc" or f"{n}[" in score + mask}
    plan = variant._plan(q, q, q, None, "fa4", False, {"varlen": True}, used)
    low = fa4_varlen._lowering(plan, fa4_varlen._documents(plan), fa4.VARLEN_HOST)
    assert low.per_row is per_row


def test_route_declines(fake):
    from attnlang.backends import fa4, fa4_varlen
    fake()
    q = torch.randn(1, 2, 48, 32)
    doc = _doc_ids(LENGTHS)
    v = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")

    def route(q_, k_, options=None, tensors=None):
        plan = v._plan(q_, k_, k_, None, "fa4", False, options, tensors or {"doc": doc})
        return fa4_varlen.route(q_, k_, k_, plan, fa4.VARLEN_HOST)

    assert route(q, q) is None                                   # inference on a short pack: tile lists
    assert route(q, q, {"varlen": False}) is None
    assert route(q, q, {"varlen": True}) is not None
    assert route(q, q, {"varlen": True}, {"doc": torch.tensor([0, 1] * 24)}) is None   # ids in many runs
    assert route(q, torch.randn(1, 2, 64, 32), {"varlen": True}, {"doc": torch.arange(64) // 8}) is None  # q != kv
    assert route(torch.randn(1, 2, 48, 40), torch.randn(1, 2, 48, 40), {"varlen": True}) is None  # head dim 40
    aligned = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    qa = torch.randn(1, 2, 256, 32, requires_grad=True)
    plan = aligned._plan(qa, qa, qa, None, "fa4", False, None, {"doc": torch.arange(256) // 128})
    assert fa4_varlen.route(qa, qa, qa, plan, fa4.VARLEN_HOST) is None  # tile lists need no mask_mod there
    plain = al.compile(mask="q_idx >= kv_idx")._plan(q, q, q, None, "fa4", False, {"varlen": True}, {})
    assert fa4_varlen.route(q, q, q, plain, fa4.VARLEN_HOST) is None


def test_varlen_option_validated():
    from attnlang.backends import fa4
    q = torch.randn(1, 2, 8, 16)
    plan = al.compile(mask="q_idx >= kv_idx")._plan(q, q, q, None, "fa4", False, {"varlen": 1}, {})
    assert "True or False" in fa4.unsupported(q, plan)


def test_describe_says_which_path(fake):
    from attnlang.backends import fa4, fa4_varlen
    fake()
    q = torch.randn(1, 2, 48, 32)
    plan = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")._plan(
        q, q, q, None, "fa4", False, {"varlen": True}, {"doc": _doc_ids(LENGTHS)})
    text = fa4_varlen.describe(q, q, q, plan, fa4.VARLEN_HOST)
    assert "varlen forward" in text and "4 sequences" in text and "(None, 0)" in text


# ----- per-call host work of the fa4 path (no timings: what it asks the kernel for) -----

def test_fa4_asks_for_lse_only_when_wanted(monkeypatch):
    import sys
    from pathlib import Path

    from attnlang.backends import fa4
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_host import StubFA4
    seen = []

    class Recording(StubFA4):
        def flash_attn_func(self, q, k, v, return_lse=False, **kw):
            seen.append(return_lse)
            return super().flash_attn_func(q, k, v, return_lse=return_lse, **kw)

        def _flash_attn_fwd(self, q, k, v, return_lse=False, **kw):  # what inference calls
            seen.append(return_lse)
            return super()._flash_attn_fwd(q, k, v, return_lse=return_lse, **kw)

    stub = Recording()
    monkeypatch.setattr(fa4, "_flash", lambda: stub)
    monkeypatch.setattr(fa4, "_device_problem", lambda q: None)
    q = torch.randn(2, 4, 16, 32, dtype=torch.bfloat16)
    variant = al.compile(mask="q_idx >= kv_idx")
    out = variant(q, q, q, backend="fa4")
    assert out.shape == (2, 4, 16, 32)
    _, lse = variant(q, q, q, backend="fa4", return_lse=True)
    assert seen == [False, True] and lse.shape == (2, 4, 16)


def test_bench_host_cpu_mode_runs(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from attnlang.backends import fa4
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_host
    monkeypatch.setattr(fa4, "_flash", fa4._flash)          # the benchmark replaces both: undo afterwards
    monkeypatch.setattr(fa4, "_device_problem", fa4._device_problem)
    bench_host.main(["--n", "3", "--out", str(tmp_path)])
    import json
    doc = json.loads((tmp_path / "host_cpu.json").read_text())
    assert set(doc["variants"]) == set(bench_host.VARIANTS)
    assert all(row["attnlang_fa4_us"] > 0 for row in doc["variants"].values())


def test_lowering_reuse_keeps_no_plan_alive():
    """The lowering is reused for the very plan unsupported() just saw, without holding the plan (and its named
    tensors) after the call."""
    import gc
    import weakref

    from attnlang.backends import fa4
    q = torch.randn(1, 2, 64, 32)
    doc = torch.arange(64) // 8
    plan = al.compile(mask="doc[q_idx] == doc[kv_idx]")._plan(q, q, q, None, "fa4", False, None, {"doc": doc})
    low = fa4.lowering(plan)
    assert fa4.lowering(plan) is low
    gone = weakref.ref(doc)
    del plan, doc
    gc.collect()
    assert gone() is None


class ReplayableFakeFA4:
    """FakeFA4 with its work inside "compiled kernels" of compile caches, as flash_attn.cute's interface keeps
    them: the host functions only allocate and launch, so attnlang.backends.fa4_replay can record and replay
    them. ``host_calls`` counts the host functions' calls (a replayed call makes none)."""

    def __init__(self, dense_mask=None):
        inner = FakeFA4(dense_mask)
        self.calls = inner.calls
        self.host_calls = host = {"fwd": 0, "bwd": 0}

        def fwd_kernel(q, k, v, out, lse, cu_q, cu_k, aux, rest):
            o, lse_ = inner._flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, aux_tensors=aux,
                                            return_lse=True, **dict(rest))[:2]
            out.copy_(o)
            lse.copy_(lse_)

        def bwd_kernel(q, k, v, out, dout, lse, dlse, dq, dk, dv, cu_q, cu_k, aux, rest):
            grads = inner._flash_attn_bwd(q, k, v, out, dout, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                          aux_tensors=aux, dlse=dlse, **dict(rest))
            for dst, g in zip((dq, dk, dv), grads):
                dst.copy_(g)

        def _flash_attn_fwd(q, k, v, out=None, return_lse=False, cu_seqlens_q=None, cu_seqlens_k=None,
                            aux_tensors=None, **rest):
            host["fwd"] += 1
            varlen = cu_seqlens_q is not None
            o = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype) if out is None else out
            lse = torch.empty((q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1]),
                              dtype=q.dtype)
            _flash_attn_fwd.compile_cache.setdefault("fwd", fwd_kernel)
            _flash_attn_fwd.compile_cache["fwd"](q.detach(), k.detach(), v.detach(), o, lse, cu_seqlens_q,
                                                 cu_seqlens_k, aux_tensors, tuple(sorted(rest.items())))
            return o, (lse if return_lse else None), None, None, None

        def _flash_attn_bwd(q, k, v, out, dout, lse, cu_seqlens_q=None, cu_seqlens_k=None, aux_tensors=None,
                            dlse=None, **rest):
            host["bwd"] += 1
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            _flash_attn_bwd.compile_cache.setdefault("bwd", bwd_kernel)
            _flash_attn_bwd.compile_cache["bwd"](q, k, v, out, dout, lse, dlse, dq, dk, dv, cu_seqlens_q,
                                                 cu_seqlens_k, aux_tensors, tuple(sorted(rest.items())))
            return dq, dk, dv

        _flash_attn_fwd.compile_cache, _flash_attn_bwd.compile_cache = {}, {}
        self._flash_attn_fwd, self._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd


@pytest.mark.parametrize("grads,direction", [(True, "varlen"), (False, "varlen"), (True, "tile_list_forward")],
                         ids=["fwd_bwd", "fwd", "tile_list_fwd_varlen_bwd"])
def test_route_replays_warm_calls(monkeypatch, grads, direction):
    """One plan called with fresh q / k / v: from the fourth call on FA4's host functions are not called (their
    recorded launches replay; the folded tile-list forward writes into a buffer it is given, out=), and every call
    agrees with eager, gradients included. (A short pack's inference runs tile lists, not this path.)"""
    from attnlang.backends import fa4, fa4_varlen
    doc = _doc_ids(LENGTHS)
    dense = (doc[:, None] == doc[None, :]) & (torch.arange(48)[:, None] >= torch.arange(48)[None, :])
    fa = ReplayableFakeFA4(dense)
    monkeypatch.setattr(fa4, "_flash", lambda: fa)
    monkeypatch.setattr(fa4, "_load", lambda module: None)
    monkeypatch.setattr(fa4, "_block_sparse", lambda plan, low, device: (None, None, True))
    options = {"varlen": True} if direction == "varlen" else None
    variant = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    plan = None
    for call in range(6):
        g = torch.Generator().manual_seed(call)
        q, k, v = (torch.randn(2, H, 48, 32, dtype=torch.float64, generator=g).requires_grad_(grads)
                   for H in (4, 2, 2))
        if plan is None:
            plan = variant._plan(q, k, v, None, "fa4", True, options, {"doc": doc})
        with torch.set_grad_enabled(grads):
            out, lse = fa4_varlen.route(q, k, v, plan, fa4.VARLEN_HOST)
        qe, ke, ve = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
        ref, ref_lse = variant(qe, ke, ve, backend="eager", return_lse=True, doc=doc)
        torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-6)
        if grads:
            dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
            got = torch.autograd.grad(out, (q, k, v), dout)
            want = torch.autograd.grad(ref, (qe, ke, ve), dout)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    if grads and direction == "tile_list_forward":
        assert fa.calls[:2] == ["fwd dense", "bwd varlen"]
    assert fa.host_calls == {"fwd": 3, "bwd": 3 if grads else 0}


def test_training_calls_on_the_varlen_path_free_their_outputs(fake):
    # no autograd node of the varlen path may hold its own outputs (a reference cycle through the C++ graph,
    # which Python's collector cannot free: fa4._FlashTraining leaked every training step that way)
    import gc
    import weakref
    fake()
    doc = _doc_ids(LENGTHS)
    refs = []
    for seed in range(3):
        out, lse, _, _ = _run("doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": doc}, options={"varlen": True},
                              seed=seed)
        base = out
        while base._base is not None:
            base = base._base
        refs.append(weakref.ref(base))
        del out, lse, base
    gc.collect()
    assert all(r() is None for r in refs), "a varlen training call's output outlived it"


def test_an_in_place_write_to_a_score_tensor_before_the_varlen_backward_is_an_error(fake, monkeypatch):
    # the varlen backward's score_mod_bwd reads the aux tensors again (a position-indexed table is one: not baked
    # into the module, often the caller's tensor itself): written in place between forward and backward, the
    # gradients would silently be the new values'; now autograd's in-place error, as in eager
    from types import SimpleNamespace

    from attnlang.backends import fa4, fa4_varlen
    fake()

    def score_mod(s, seq, h, i, j, offset_q, offset_k, aux):
        return s + aux[0][(offset_k + j) % 48]
    monkeypatch.setattr(fa4, "_load", lambda module: SimpleNamespace(score_mod=score_mod, score_mod_bwd=object()))
    variant = al.compile(score="score + bias[kv_idx]", mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    bias = torch.randn(48)  # float32: the kernel reads it as it is (no converted copy)
    tensors = {"doc": _doc_ids(LENGTHS), "bias": bias}
    q, k, v = (torch.randn(2, 4, 48, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plan = variant._plan(q, k, v, None, "fa4", True, {"varlen": True}, tensors)
    out, _ = fa4_varlen.route(q, k, v, plan, fa4.VARLEN_HOST)
    assert plan.tensors["bias"] is bias
    bias.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_route_does_not_replay_plans_whose_named_tensors_are_too_large_to_pin(monkeypatch):
    # a replay holds the plan's aux tensors (here doc itself) strongly, which would keep a plan's named tensors
    # alive after the caller dropped them (fa4._pinnable); over the limit a call runs FA4's own host call each time
    from attnlang.backends import fa4, fa4_varlen
    doc = _doc_ids(LENGTHS)
    dense = (doc[:, None] == doc[None, :]) & (torch.arange(48)[:, None] >= torch.arange(48)[None, :])
    fa = ReplayableFakeFA4(dense)
    monkeypatch.setattr(fa4, "_flash", lambda: fa)
    monkeypatch.setattr(fa4, "_load", lambda module: None)
    monkeypatch.setattr(fa4, "_PIN_MAX_BYTES", doc.numel() * doc.element_size() - 1)
    variant = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    plan = None
    with torch.no_grad():
        for call in range(6):
            g = torch.Generator().manual_seed(call)
            q, k, v = (torch.randn(2, H, 48, 32, dtype=torch.float64, generator=g) for H in (4, 2, 2))
            if plan is None:
                plan = variant._plan(q, k, v, None, "fa4", True, {"varlen": True}, {"doc": doc})
            out, _ = fa4_varlen.route(q, k, v, plan, fa4.VARLEN_HOST)
            torch.testing.assert_close(out, variant(q, k, v, backend="eager", doc=doc), atol=1e-9, rtol=1e-9)
    assert fa.host_calls["fwd"] == 6
