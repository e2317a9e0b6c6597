"""What a hostile user found on the CPU (issue 19): silent wrong results and stray exceptions, one test each.

Each test names the behaviour it pins; each failed on the code before its fix.
"""


import pytest
import torch

import attnlang as al

# ---------------------------------------------------------------------------------------------------------------
# 1. flex must never run another variant's kernel (Dynamo's cache of flex's unfused wrapper)


def _agree(variant, q, **tensors):
    got = variant(q, q, q, backend="flex", **tensors)
    want = variant(q, q, q, backend="eager", **tensors)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pair", [
    ("kv_idx < pre[0]", "kv_idx >= pre[0]"),
    ("kv_idx <= pre[0]", "kv_idx > pre[0]"),
    ("q_idx == pre[0]", "q_idx != pre[0]"),
])
def test_flex_masks_differing_in_comparison_do_not_share_a_kernel(pair):
    q = torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(0))
    pre = torch.tensor([3])
    a, b = (al.compile(mask=m) for m in pair)
    _agree(a, q, pre=pre)
    _agree(b, q, pre=pre)
    _agree(a, q, pre=pre)


def test_flex_scores_differing_in_comparison_do_not_share_a_kernel():
    q = torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5, -1.0, 2.0])
    a = al.compile(score="where(t[1] > 0.0, score, 0.0)")
    b = al.compile(score="where(t[1] < 0.0, score, 0.0)")
    _agree(a, q, t=t)
    _agree(b, q, t=t)


def test_flex_same_expression_other_lengths_reuses_nothing_wrong():
    # the lengths folded into the mods are part of the kernel's key too
    v = al.compile(mask="kv_idx <= q_idx + kv_len - q_len")
    for s in (5, 7, 5):
        q = torch.randn(1, 1, s, 4, generator=torch.Generator().manual_seed(s))
        k = torch.randn(1, 1, s + 2, 4, generator=torch.Generator().manual_seed(s + 1))
        torch.testing.assert_close(v(q, k, k, backend="flex"), v(q, k, k, backend="eager"), atol=1e-5, rtol=1e-5)
