"""Variants compose: a & b, a | b, ~a (API.md), checked against the masks computed by hand."""

import pickle

import pytest
import torch

import attnlang as al


def _allowed(v, sq=9, skv=11, **tensors):
    """Which pairs a variant allows, from the eager backend: one-hot values make out[.., j] > 0 iff kv j attends."""
    q = torch.zeros(1, 1, sq, 4, dtype=torch.float64)
    vv = torch.zeros(1, 1, skv, skv, dtype=torch.float64)
    vv[0, 0, torch.arange(skv), torch.arange(skv)] = 1.0
    out = v(q, torch.zeros(1, 1, skv, 4, dtype=torch.float64), vv, backend="eager", **tensors)
    return out[0, 0] > 0


I = torch.arange(9).view(9, 1)
J = torch.arange(11).view(1, 11)
DOC = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


def test_documents_and_causal_is_document_causal():
    doc = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    causal = al.compile(mask="q_idx >= kv_idx")
    both = doc & causal
    assert both == al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    assert torch.equal(_allowed(both, doc=DOC), (DOC[:9].view(9, 1) == DOC.view(1, 11)) & (I >= J))


def test_or_not_and_bindings_that_clash_are_renamed():
    a = al.compile(mask="d = q_idx - kv_idx; 0 <= d & d < w", params={"w": 3})
    b = al.compile(mask="d = kv_idx - q_idx\nd < w", params={"w": 3})
    c = al.compile(mask="kv_idx < g", params={"g": 2})
    v = (a & b) | ~c
    assert v.params == {"w": 3, "g": 2}
    want = ((I - J >= 0) & (I - J < 3) & (J - I < 3)) | ~(J < 2)
    assert torch.equal(_allowed(v), want)
    assert al.from_config(v.to_config()) == v
    assert pickle.loads(pickle.dumps(v)) == v


def test_a_binding_named_like_another_parts_tensor_or_param():
    a = al.compile(mask="doc = q_idx // 3; doc == kv_idx // 3")
    b = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    c = al.compile(mask="i = kv_idx; any(q_idx == i + k for k in range(2))")
    d = al.compile(mask="any(q_idx == kv_idx - i for i in range(n))", params={"n": 2})
    v = a & b | (c & d)
    blocks = (I // 3) == (J // 3)
    same_doc = DOC[:9].view(9, 1) == DOC.view(1, 11)
    near = (I == J) | (I == J + 1)
    behind = (I == J) | (I == J - 1)
    assert torch.equal(_allowed(v, doc=DOC), (blocks & same_doc) | (near & behind))


def test_variants_compose_with_themselves():
    a = al.compile(mask="qb = q_idx // 4; qb == kv_idx // 4")
    assert torch.equal(_allowed(a & a), _allowed(a))
    assert torch.equal(_allowed(a | ~a), torch.ones(9, 11, dtype=torch.bool))


@pytest.mark.parametrize("make, word", [
    (lambda: al.compile(mask="q_idx < w", params={"w": 2}) & al.compile(mask="kv_idx < w", params={"w": 3}),
     "cannot merge parameter 'w'"),
    (lambda: al.compile(mask="q_idx < w", params={"w": 2}) & al.compile(mask="kv_idx < w", params={"w": 2.0}),
     "cannot merge parameter 'w'"),
    (lambda: al.compile("score * 2") & al.compile(mask="q_idx >= kv_idx"), "score must be 'score'"),
    (lambda: ~al.compile("score + slope[h]"), "score must be 'score'"),
    (lambda: al.compile(mask="q_idx >= kv_idx") | "q_idx > 0", "two attnlang Variants"),
])
def test_composition_errors(make, word):
    with pytest.raises(al.AttnLangError, match=word):
        make()
