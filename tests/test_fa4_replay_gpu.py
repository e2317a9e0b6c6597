"""The fa4 backend's replayed calls (attnlang.backends.fa4_replay) on the GPU: a signature called again and again
with fresh inputs reaches the replay state, forward and backward, and every call, replayed or not, agrees with
the eager reference (out, lse, dq, dk, dv) as the first call does."""

import pytest
import torch
from test_fa4_gpu import GRAD_TOL, LSE_TOL, OUT_TOL, _rel

import attnlang as al
from attnlang import op
from attnlang.backends import fa4_replay

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("needs_fa4")]

# (name, score, mask, head dim, whether the call has an emitted score_mod / mask_mod): with grouped heads, such a
# call's backward runs with k / v expanded (the GUARDS table's "expand" fix), through flash_attn_func's autograd
# path, which is never replayed
CASES = [
    ("causal", "score", "q_idx >= kv_idx", 128, False),
    ("window", "score", "0 <= q_idx - kv_idx < 100", 64, False),
    ("alibi", "score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", 128, True),
    ("softcap", "30 * tanh(score / 30)", "True", 64, True),
    ("bias_table", "score + bias[kv_idx]", "q_idx >= kv_idx", 64, True),
    ("prefix_lm", "score", "(kv_idx < 64) | (q_idx >= kv_idx)", 128, True),
    # packed documents: a short pack's training call runs a tile-list forward and a varlen backward (fa4_varlen)
    ("documents", "score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", 128, False),
]


def _tensors(name, Hq, S):
    g = torch.Generator(device="cuda").manual_seed(7)
    if name == "alibi":
        return {"slope": torch.rand(Hq, device="cuda", generator=g)}
    if name == "bias_table":
        return {"bias": torch.randn(S, device="cuda", generator=g)}
    if name == "documents":
        lengths = torch.tensor([70, 1, 129, 100])  # 300 positions, off the 128-row tiles
        return {"doc": torch.repeat_interleave(torch.arange(4), lengths).cuda()}
    return {}


@pytest.mark.parametrize("grads", [True, False], ids=["fwd_bwd", "fwd"])
@pytest.mark.parametrize("name,score,mask,D,modifier", CASES, ids=[c[0] for c in CASES])
def test_replayed_calls_agree_with_the_reference(name, score, mask, D, modifier, grads):
    _replay_six_calls(name, score, mask, D, modifier, grads, through_op=True, options=None)


EAGER_CASES = [c for c in CASES if c[0] in ("causal", "window", "alibi", "documents")]


@pytest.mark.parametrize("grads", [True, False], ids=["fwd_bwd", "fwd"])
@pytest.mark.parametrize("name,score,mask,D,modifier", EAGER_CASES, ids=[c[0] for c in EAGER_CASES])
def test_replayed_eager_calls_agree_with_the_reference(name, score, mask, D, modifier, grads):
    # plain variant calls (no op): training through fa4._FlashTraining; documents forced onto the varlen path
    # both ways, so that fa4_varlen's forward and backward replays are reached too
    options = {"varlen": True} if name == "documents" else None
    _replay_six_calls(name, score, mask, D, modifier, grads, through_op=False, options=options)


def _replay_six_calls(name, score, mask, D, modifier, grads, through_op, options):
    B, Hq, Hkv, S = 2, 8, 2, 300
    variant = al.compile(score=score, mask=mask)
    tensors = _tensors(name, Hq, S)
    # the replays alive before this test, held for its length: _ALL is a WeakSet, and a replay freed during the
    # test could hand its id to a new one
    before = list(fa4_replay._ALL)
    for call in range(6):
        g = torch.Generator(device="cuda").manual_seed(call)
        q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                for _ in range(2))
        dout = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        qf, kf, vf = (t.float().detach().requires_grad_(grads) for t in (q, k, v))
        ref, ref_lse = variant(qf, kf, vf, backend="eager", return_lse=True, **tensors)
        qb, kb, vb = (t.detach().requires_grad_(grads) for t in (q, k, v))
        with torch.set_grad_enabled(grads):
            if through_op:  # the op: its backward calls FA4's backward itself (direct backward)
                out, lse = op.call(variant, qb, kb, vb, None, "fa4", True, options, tensors)
            else:  # an eager call: training runs through fa4._FlashTraining
                out, lse = variant(qb, kb, vb, backend="fa4", return_lse=True, kernel_options=options, **tensors)
        assert _rel(out, ref) < OUT_TOL, f"call {call}: out rel err {_rel(out, ref):.2e}"
        finite = ~torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), ~finite)
        assert float((lse - ref_lse)[finite].abs().max()) < LSE_TOL
        if grads:
            ref.backward(dout.float())
            out.backward(dout)
            for what, a, b in (("dq", qb.grad, qf.grad), ("dk", kb.grad, kf.grad), ("dv", vb.grad, vf.grad)):
                assert _rel(a, b) < GRAD_TOL, f"call {call}: {what} rel err {_rel(a, b):.2e}"
        torch.cuda.synchronize()  # the check's result arrives (pinned memory) before the next call
    mine = [r for r in list(fa4_replay._ALL) if not any(r is b for b in before)]
    if grads and modifier:
        assert not mine, "a guard-fixed call must not be replayed"
        return
    assert mine, "no replay was made for this signature"
    kinds = {"exact"} | ({"tolerance"} if grads else set())
    for kind in kinds:
        got = [(r.state, r.why) for r in mine if ("exact" if r.exact else "tolerance") == kind]
        assert any(state == "replay" for state, _ in got), f"{kind}: {got}"
