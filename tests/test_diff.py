"""attnlang.diff: the symbolic d(score_expr)/d(score) against torch.autograd on the eager lowering."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlang as al
from attnlang.ast import Const, DType
from attnlang.check import bind
from attnlang.diff import depends_on_score, derivative
from attnlang.lower_torch import evaluate

SCORES = [
    "score",
    "score + slope[h] * (kv_idx - q_idx)",
    "30 * tanh(score / 30)",
    "score * 2 - 1",
    "score / (1 + abs(score))",
    "exp(score / 4) + exp2(score / 8) + sigmoid(score)",
    "log(1 + score * score) + log2(2 + abs(score)) + sqrt(1 + score * score)",
    "min(score, 3.0) + max(score, -2.0) + clamp(score, -1.5, 1.5)",
    "where(q_idx >= kv_idx, score * bias[h], score - 1)",
    "score ** 2 + score ** 3 / 10 + score % 1.5 + score // 2",
    "floor(score) + ceil(score) + sign(score) + float(int(score)) + score",
    "-score + float(q_idx % 3) * score",
    "score * score * score",
    "where(score > 0, score, 0.1 * score)",
]


def _grad_check(src: str, seed: int):
    v = al.compile(score=src)
    tensors = {"slope": torch.rand(4, dtype=torch.float64), "bias": torch.randn(4, dtype=torch.float64)}
    dtypes = {n: DType.FLOAT for n in v.checked.tensors}
    expr = bind(v.checked, dtypes).score
    g = torch.Generator().manual_seed(seed)
    shape = (1, 4, 5, 6)
    score = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    names = {
        "score": score,
        "b": torch.zeros(1, 1, 1, 1, dtype=torch.int64),
        "h": torch.arange(4).view(1, 4, 1, 1),
        "q_idx": torch.arange(5).view(1, 1, 5, 1),
        "kv_idx": torch.arange(6).view(1, 1, 1, 6),
        "q_len": torch.tensor(5), "kv_len": torch.tensor(6),
    }
    used = {n: t for n, t in tensors.items() if n in v.checked.tensors}
    out = evaluate(expr, names, used, torch.float64)
    (auto,) = torch.autograd.grad(out.sum(), score)
    d = derivative(expr)
    sym = evaluate(d, {**names, "score": score.detach()}, used, torch.float64)
    sym = torch.as_tensor(sym, dtype=torch.float64).expand(shape)
    torch.testing.assert_close(sym, auto, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("src", SCORES)
def test_derivative_matches_autograd(src):
    _grad_check(src, seed=0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), src=st.sampled_from(SCORES))
def test_derivative_matches_autograd_random_inputs(seed, src):
    _grad_check(src, seed)


def test_identity_like_scores_differentiate_to_one():
    for src in ("score", "score + slope[h] * (kv_idx - q_idx)", "score - 3"):
        expr = bind(al.compile(score=src).checked, {"slope": DType.FLOAT}).score
        assert derivative(expr) == Const(1.0, DType.FLOAT)


def test_depends_on_score():
    assert depends_on_score(al.compile(score="score * 2").checked.score)
    assert not depends_on_score(al.compile(mask="q_idx >= kv_idx").checked.mask)
