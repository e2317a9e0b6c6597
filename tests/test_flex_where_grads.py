"""Gradients of flex's score_mod through an unchosen ``where`` branch (``evaluate(..., guard_branches=True)``).

FlexAttention builds its backward from the autograd of the traced score_mod, and has no backward on the CPU: these
tests run the score_mod flex's backend builds (``backends.flex._mods``) under plain autograd, both on broadcast
grids and on 0-d values through nested ``torch.vmap`` (how flex's unfused path calls a mod). The GPU test is
tests/test_hostile_gpu.py::test_gradients_through_an_unchosen_where_branch_stay_finite_on_cuda.
"""

import functools

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import attnlang as al
from attnlang.backends import flex
from attnlang.lower_torch import evaluate

S = 16
H = 2


def _plan(score: str, tensors: dict):
    q = torch.randn(1, H, S, 8)
    return al.compile(score=score, mask="q_idx >= kv_idx")._plan(q, q, q, None, "flex", False, None, tensors)


def _score_mod(plan):
    """The score_mod exactly as flex's _make_body builds it (folded lengths, float32, int64 ints)."""
    names = tuple(sorted(flex._tensor_names(plan.score) | flex._tensor_names(plan.mask)))
    named = tuple(plan.tensors[n] for n in names)
    score = flex._prepare(plan.score, S, S, torch.float32)
    score_mod, _ = flex._mods(score, plan.mask, names, named, S, S, torch.float32)
    assert score_mod is not None
    return score_mod


def _grids():
    return (torch.arange(1).view(1, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(S).view(1, 1, S, 1), torch.arange(S).view(1, 1, 1, S))


def _vmapped(fn):
    """fn over [1, H, S, S] scores and 1-d b / h / q_idx / kv_idx, called on 0-d values (flex's _vmap_for_bhqkv)."""
    n = None
    for dims in ((0, n, n, n, 0), (0, n, n, 0, n), (0, n, 0, n, n), (0, 0, n, n, n)):
        fn = torch.vmap(fn, in_dims=dims)
    return fn


def _call(score_mod, s, how):
    if how == "grid":
        return score_mod(s, *_grids())
    return _vmapped(score_mod)(s, torch.arange(1), torch.arange(H), torch.arange(S), torch.arange(S))


def _scores():
    torch.manual_seed(0)
    s = torch.randn(1, H, S, S)
    s[..., 0, :] = 0.0  # exact zeros: sqrt'(0) is inf, the unchosen branch there too
    return s.requires_grad_(True)


def _unguarded_grad(plan, s, names=None):
    names = dict(zip(("b", "h", "q_idx", "kv_idx"), _grids()), score=s) if names is None else names
    out = evaluate(plan.score, names, plan.tensors, torch.float32)
    (grad,) = torch.autograd.grad(out.sum(), s)
    return out, grad


@pytest.mark.parametrize("how", ["grid", "vmap"])
def test_score_grad_through_an_unchosen_sqrt_is_finite_and_matches_eager(how):
    plan = _plan("where(score > 0.0, sqrt(score), score)", {})
    s = _scores()
    out = _call(_score_mod(plan), s, how)
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(grad).all()
    # the unguarded evaluation (flex before guard_branches) is NaN here: the test sees the guard
    plain, plain_grad = _unguarded_grad(plan, s)
    assert torch.isnan(plain_grad).any()
    # forward values unchanged; gradients those of eager's pick_branches evaluation
    torch.testing.assert_close(out, plain.expand_as(out), rtol=0, atol=0)
    names = dict(zip(("b", "h", "q_idx", "kv_idx"), _grids()), score=s)
    (want,) = torch.autograd.grad(evaluate(plan.score, names, {}, torch.float32, pick_branches=True).sum(), s)
    torch.testing.assert_close(grad, want)
    sd = s.detach()
    torch.testing.assert_close(grad, torch.where(sd > 0, 0.5 / sd.sqrt(), torch.ones_like(sd)))


@pytest.mark.parametrize("how", ["grid", "vmap"])
def test_tensor_grad_through_an_unchosen_branch_is_finite(how):
    bias = torch.tensor([-0.25, -0.5], requires_grad=True)  # s - bias > 0 wherever s > 0 (chosen)
    plan = _plan("where(score > 0.0, sqrt(score - bias[h]), score)", {"bias": bias})
    assert plan.tensors["bias"] is bias or plan.tensors["bias"].grad_fn is not None
    s = _scores()
    out = _call(_score_mod(plan), s, how)
    gs, gb = torch.autograd.grad(out.sum(), (s, bias))
    assert torch.isfinite(gs).all() and torch.isfinite(gb).all()
    # without the guard the bias gradient is NaN (score - bias < 0 in the unchosen branch where score < bias)
    names = dict(zip(("b", "h", "q_idx", "kv_idx"), _grids()), score=s)
    plain = evaluate(plan.score, names, plan.tensors, torch.float32)
    assert torch.isnan(torch.autograd.grad(plain.sum(), bias)[0]).any()
    torch.testing.assert_close(out, plain.expand_as(out), rtol=0, atol=0)
    # where chosen, d/d bias[h] = -0.5 / sqrt(s - bias[h])
    sd, bd = s.detach(), bias.detach().view(1, H, 1, 1)
    chosen = sd > 0
    want = torch.where(chosen, -0.5 / (sd - bd).sqrt(), torch.zeros_like(sd)).sum(dim=(0, 2, 3))
    torch.testing.assert_close(gb, want)


def test_nested_wheres_guard_by_the_conjunction_of_their_conditions():
    # log(score) is chosen only where score > 0 and score < 1; elsewhere its derivative (inf at 0, NaN below) is
    # unchosen; the inner where's else branch sqrt(score - 1) is unchosen below 1
    plan = _plan("where(score > 0.0, where(score < 1.0, log(score), sqrt(score - 1.0)), score)", {})
    s = _scores()
    with torch.no_grad():
        s[..., 1, :] = 1.0  # sqrt'(0) at score = 1, chosen: inf there (a true infinite derivative)
        s[..., 1, :1] = 0.5
    out = _call(_score_mod(plan), s, "grid")
    (grad,) = torch.autograd.grad(out.sum(), s)
    _, plain_grad = _unguarded_grad(plan, s)
    assert torch.isnan(plain_grad).any()
    sd = s.detach()
    want = torch.where(sd > 0, torch.where(sd < 1, 1 / sd, 0.5 / (sd - 1).sqrt()), torch.ones_like(sd))
    torch.testing.assert_close(grad, want)
    assert not torch.isnan(grad).any()


def test_zero_dim_condition():
    plan = _plan("where(score > 0.0, sqrt(score), score)", {})
    score_mod = _score_mod(plan)
    for value in (-2.0, 0.0, 4.0):
        s = torch.tensor(value, requires_grad=True)
        out = score_mod(s, *(torch.tensor(0) for _ in range(4)))
        (grad,) = torch.autograd.grad(out, s)
        assert out.dim() == 0 and torch.isfinite(grad)
        assert grad.item() == (0.25 if value == 4.0 else 1.0)


def test_no_float_where_evaluates_unchanged():
    """guard_branches adds nothing to an expression without a float where (the traced graph is the same)."""
    plan = _plan("score * 2.0 + float(where(q_idx > kv_idx, 1, 0))", {})
    names = dict(zip(("b", "h", "q_idx", "kv_idx"), _grids()), score=_scores())
    graphs = []
    for guard in (False, True):
        def fn(s, b, h, qi, ki, guard=guard):
            return evaluate(plan.score, dict(score=s, b=b, h=h, q_idx=qi, kv_idx=ki), {}, torch.float32,
                            guard_branches=guard)
        gm = make_fx(functools.partial(fn, guard=guard))(
            names["score"].detach(), names["b"], names["h"], names["q_idx"], names["kv_idx"])
        graphs.append([n.target for n in gm.graph.nodes])
    assert graphs[0] == graphs[1]


def test_guarded_score_mod_traces_in_one_dynamo_graph_with_finite_grads():
    """torch.compile traces a flex mod whole (a graph break inside one is an error): fullgraph, and the AOT joint
    graph (what flex's backward is made from) keeps the guards."""
    torch._dynamo.reset()
    plan = _plan("where(score > 0.0, sqrt(score - bias[h]), score)", {"bias": torch.tensor([-0.25, -0.5])})
    score_mod = torch.compile(_score_mod(plan), fullgraph=True, backend="aot_eager")
    s = _scores()
    out = score_mod(s, *_grids())
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(grad).all()


@pytest.mark.slow
def test_compiled_cpu_flex_forward_with_guarded_branches_matches_eager():
    """The guards (where + detach) trace and compile in flex's compiled CPU kernel, values as eager's (~10 s)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, 64, 16) for _ in range(3))
    bias = torch.tensor([-0.25, -0.5])
    variant = al.compile(score="where(score > 0.0, sqrt(score - bias[h]), where(score < -1.0, score * 2.0, score))",
                         mask="q_idx >= kv_idx")
    base = variant._plan(q, k, v, None, "flex", False, None, {"bias": bias})
    # a plan asking for no lse, so flex takes its compiled CPU kernel (tests/test_flex.py's _NoLsePlan)
    plan = type("NoLsePlan", (), {"return_lse": False, "options": {**base.options, "CPU_COMPILED": True},
                                  "__getattr__": lambda self, name: getattr(base, name)})()
    assert flex.unsupported(q, plan) is None
    with torch.no_grad():
        out, _ = flex.attention(q, k, v, plan)
    torch.testing.assert_close(out, variant(q, k, v, backend="eager", bias=bias), atol=1e-5, rtol=1e-5)
