"""Gradients through min / max / clamp where the unchosen operand has an infinite or NaN local derivative.

``min(1.0 / score, 10.0)`` at score 0 is 10 (the select picks the constant), and its derivative there is 0; a select
built as ``torch.where`` sends the unchosen ``1 / score`` a zero gradient, which times its derivative ``-1 / score**2
= -inf`` is NaN. ``evaluate(..., guard_branches=True)`` guards each operand's leaves by where that operand is the
chosen one (as for a float ``where``, tests/test_flex_where_grads.py): flex's score_mod (run here under plain
autograd, flex has no CPU backward) and eager's backward. Ties and NaN keep the select's own rule: the left operand
on a tie (``_maximum`` / ``_minimum``), a NaN operand wherever it is one.
"""

import functools

import pytest
import torch

# flex's score_mod under plain autograd, on grids or vmapped 0-d values: the where tests' helpers
from test_flex_where_grads import H, S, _call, _grids, _plan, _score_mod
from torch.fx.experimental.proxy_tensor import make_fx

import attnlang as al
from attnlang.backends import flex
from attnlang.lower_torch import evaluate


def _scores():
    torch.manual_seed(0)
    s = torch.randn(1, H, S, S)
    s[..., 0, :] = 0.0  # exact zeros: 1 / score is inf there, log(score * score) -inf
    s[..., 1, :4] = torch.tensor([0.1, -0.5, 2.0, 1.0])  # ties: 1 / 0.1 == 10, and clamp's bounds
    return s.requires_grad_(True)


def _plain(plan, s, tensors=None, guard=False):
    names = dict(zip(("b", "h", "q_idx", "kv_idx"), _grids()), score=s)
    return evaluate(plan.score, names, plan.tensors if tensors is None else tensors, torch.float32,
                    guard_branches=guard)


CASES = [
    # (score, d score' / d score where it is finite, as a function of the score)
    ("min(1.0 / score, 10.0)", lambda s: torch.where(1 / s <= 10, -1 / s**2, 0.0)),
    ("max(-1.0 / score, -10.0)", lambda s: torch.where(-1 / s >= -10, 1 / s**2, 0.0)),
    ("clamp(log(score * score), -1.0, 1.0)",
     lambda s: torch.where((torch.log(s * s) >= -1) & (torch.log(s * s) <= 1), 2 / s, 0.0)),
    ("clamp(-1.5, 1.0 / score, 10.0)", lambda s: torch.where((-1.5 < 1 / s) & (1 / s <= 10), -1 / s**2, 0.0)),
]


@pytest.mark.parametrize("how", ["grid", "vmap"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flex_score_grad_through_an_unchosen_select_operand_is_finite(case, how):
    expr, deriv = case
    plan = _plan(expr, {})
    s = _scores()
    out = _call(_score_mod(plan), s, how)
    (grad,) = torch.autograd.grad(out.sum(), s)
    plain = _plain(plan, s)
    # the unguarded select (flex before the guard) is NaN here: the test sees the guard
    assert torch.isnan(torch.autograd.grad(plain.sum(), s)[0]).any()
    torch.testing.assert_close(out, plain.expand_as(out), rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(grad).all()
    sd = s.detach()
    torch.testing.assert_close(grad, deriv(sd))


def test_flex_tensor_grad_through_an_unchosen_select_operand_is_finite():
    bias = torch.tensor([0.0, 0.5], requires_grad=True)
    plan = _plan("min(1.0 / (score - bias[h]), 10.0)", {"bias": bias})
    s = _scores()
    with torch.no_grad():
        s[0, 1, 2, :] = 0.5  # score == bias[1]: 1 / 0, unchosen
    out = _call(_score_mod(plan), s, "grid")
    gs, gb = torch.autograd.grad(out.sum(), (s, bias))
    assert torch.isfinite(gs).all() and torch.isfinite(gb).all()
    plain = _plain(plan, s)
    assert torch.isnan(torch.autograd.grad(plain.sum(), bias)[0]).any()
    d = s.detach() - bias.detach().view(1, H, 1, 1)
    want = torch.where(1 / d <= 10, 1 / d**2, 0.0).sum(dim=(0, 2, 3))
    torch.testing.assert_close(gb, want)


@pytest.mark.parametrize("expr", [
    "max(score * 2.0, score + 1.0)",            # a tie at score 1: the left operand's gradient (2)
    "min(score * 3.0, 0.5 * score)",            # a tie at 0
    "clamp(score * 2.0, score - 1.0, score + 1.0)",
    "max(tanh(score), score * 0.5) + min(exp(score), 2.0)",
])
def test_guarded_selects_keep_values_and_finite_gradients_exactly(expr):
    """Where no operand's derivative is infinite the guard changes nothing: values and gradients bit for bit,
    ties included (the select's left operand takes the whole gradient)."""
    plan = _plan(expr, {})
    s = _scores()
    with torch.no_grad():
        s[..., 2, :3] = torch.tensor([1.0, 0.0, -1.0])
    out, plain = _plain(plan, s, guard=True), _plain(plan, s)
    (g,), (gp,) = torch.autograd.grad(out.sum(), s), torch.autograd.grad(plain.sum(), s)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(g, gp, rtol=0, atol=0)


def test_a_nan_operand_is_still_chosen_under_the_guard():
    plan = _plan("max(log(score), -1.0) + min(-2.0, sqrt(score))", {})
    s = _scores()
    out, plain = _plain(plan, s, guard=True), _plain(plan, s)
    assert torch.isnan(out).any()  # log and sqrt of the negative scores: NaN propagates (torch.maximum's rule)
    torch.testing.assert_close(out, plain, rtol=0, atol=0, equal_nan=True)


def test_selects_of_bare_leaves_trace_unchanged():
    """No guard where an operand is a leaf or a constant (its gradient is the select's own): the same graph."""
    plan = _plan("max(score, 0.0) + clamp(score, -1.0, 1.0) + min(score, bias[h])", {"bias": torch.ones(H)})
    graphs = []
    for guard in (False, True):
        def fn(s, b, h, qi, ki, guard=guard):
            return evaluate(plan.score, dict(score=s, b=b, h=h, q_idx=qi, kv_idx=ki), plan.tensors,
                            torch.float32, guard_branches=guard)
        gm = make_fx(functools.partial(fn, guard=guard))(_scores().detach(), *_grids())
        graphs.append([n.target for n in gm.graph.nodes])
    assert graphs[0] == graphs[1]


def test_guarded_select_traces_in_one_dynamo_graph():
    torch._dynamo.reset()
    plan = _plan("clamp(log(score * score), -1.0, 1.0)", {})
    score_mod = torch.compile(_score_mod(plan), fullgraph=True, backend="aot_eager")
    s = _scores()
    (grad,) = torch.autograd.grad(score_mod(s, *_grids()).sum(), s)
    assert torch.isfinite(grad).all()


def test_eager_gradients_through_an_unchosen_select_operand_are_finite():
    """A zero query row makes every score of that row 0: min(1.0 / score, 10.0) is 10 there, derivative 0."""
    torch.manual_seed(1)
    q = torch.randn(1, H, 6, 8, dtype=torch.float64)
    q[:, :, 2] = 0.0
    k, v = torch.randn(1, H, 6, 8, dtype=torch.float64), torch.randn(1, H, 6, 8, dtype=torch.float64)
    grads = []
    for expr in ("min(1.0 / score, 10.0)",
                 # the same function with the singular operand under a where (guarded before)
                 "where(score > 0.1, 1.0 / score, where(score < 0.0, 1.0 / score, 10.0))"):
        qq = q.clone().requires_grad_(True)
        out = al.compile(score=expr, mask="q_idx >= kv_idx")(qq, k, v, backend="eager")
        grads.append(torch.autograd.grad((out * v.mean()).sum() + out.pow(2).sum(), qq)[0])
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.slow
def test_compiled_cpu_flex_forward_with_guarded_selects_matches_eager():
    """The select guards trace and compile in flex's compiled CPU kernel, values as eager's (~10 s)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, 64, 16) for _ in range(3))
    q[:, :, 3] = 0.0
    variant = al.compile(score="min(1.0 / score, 10.0) + clamp(log(score * score), -1.0, 1.0)", mask="q_idx >= kv_idx")
    base = variant._plan(q, k, v, None, "flex", False, None, {})
    plan = type("NoLsePlan", (), {"return_lse": False, "options": {**base.options, "CPU_COMPILED": True},
                                  "__getattr__": lambda self, name: getattr(base, name)})()
    assert flex.unsupported(q, plan) is None
    with torch.no_grad():
        out, _ = flex.attention(q, k, v, plan)
    torch.testing.assert_close(out, variant(q, k, v, backend="eager"), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# a subexpression that is 0 for every finite value (x * 0.0, x - x) has derivative 0: the chain rule through an
# outer infinite derivative (sqrt'(0) = inf) would make it 0 * inf = NaN

@pytest.mark.parametrize("expr", ["sqrt(score * 0.0)", "sqrt(0.0 * score) + score", "sqrt(score * w)",
                                  "sqrt(score - score) + 0.5 * score", "log(sqrt(score * 0.0) + 1.0)"])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_gradients_through_a_constant_zero_are_those_of_the_constant(expr, backend):
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, H, 6, 8, dtype=torch.float64) for _ in range(3))
    variant = al.compile(score=expr, mask="q_idx >= kv_idx", params={"w": 0.0} if "w" in expr else None)
    # the same function spelled without the zero (sqrt(0) = 0, log(1) = 0)
    same = al.compile(score="0.5 * score" if "0.5" in expr else "score" if "+ score" in expr else "0.0 * 1.0",
                      mask="q_idx >= kv_idx")
    qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    if backend == "eager":
        out = variant(qq, kk, v, backend="eager")
        gq, gk = torch.autograd.grad((out * v.mean(dim=2, keepdim=True)).sum(), (qq, kk))
    else:  # flex has no CPU backward: its score_mod under autograd
        plan = variant._plan(q, k, v, None, "flex", False, None, {})
        score_mod = flex._mods(flex._prepare(plan.score, 6, 6, torch.float64), plan.mask, (), (), 6, 6,
                               torch.float64)[0]
        s = (qq @ kk.transpose(-1, -2) / 8 ** 0.5)
        b, h, qi, ki = (torch.arange(1).view(1, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
                        torch.arange(6).view(1, 1, 6, 1), torch.arange(6).view(1, 1, 1, 6))
        out = score_mod(s, b, h, qi, ki)
        gq, gk = torch.autograd.grad(out.sum(), (qq, kk))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()
    if backend == "eager":
        q2, k2 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        out2 = same(q2, k2, v, backend="eager")
        torch.testing.assert_close(out, out2)
        want = torch.autograd.grad((out2 * v.mean(dim=2, keepdim=True)).sum(), (q2, k2), allow_unused=True)
        for got, w in zip((gq, gk), want):
            torch.testing.assert_close(got, torch.zeros_like(got) if w is None else w)


@pytest.mark.parametrize("score", ["0.0", "float(q_idx - kv_idx)", "bias[h] * 2.0"])
def test_eager_score_without_score_gives_zero_gradients_to_q_and_k(score):
    """As flex's tie: out depends on q and k (zero gradient), so autograd.grad(out, q) is zeros, not an error."""
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    k = torch.randn(1, 1, 4, 8, requires_grad=True)
    tensors = {"bias": torch.ones(1)} if "bias" in score else {}
    out = al.compile(score=score, mask="q_idx >= kv_idx")(q, k, torch.randn(1, 1, 4, 8), backend="eager", **tensors)
    gq, gk = torch.autograd.grad(out.sum(), (q, k))
    assert torch.equal(gq, torch.zeros_like(q)) and torch.equal(gk, torch.zeros_like(k))


def _graph_size(expr: str, guard: bool) -> int:
    v = al.compile(score=expr)
    gm = make_fx(lambda s: evaluate(v.simplified.score, {"score": s}, {}, torch.float32, guard_branches=guard))(
        torch.randn(4, 4))
    return len(gm.graph.nodes)


def test_a_max_reduction_traces_without_blowup():
    """Operands whose local derivatives are all finite need no guard (the same graph); guarded ones are evaluated
    once plainly for the pick and once guarded per level: n log n, not 2 ** depth (a balanced max tree of 32
    terms is 5 levels deep)."""
    tame = "max(score * (1.0 + 0.01 * float(i)) for i in range(64))"
    assert _graph_size(tame, True) == _graph_size(tame, False)
    risky = "max(log(score * score + float(i)) for i in range(32))"
    assert _graph_size(risky, True) < 12 * _graph_size(risky, False)
