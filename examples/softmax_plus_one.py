"""Softmax plus one: a sink of logit 0 in every row, so a head can attend to nothing; causal.

From: Evan Miller, 2023, "Attention Is Off By One" (softmax_1(x)_i = exp(x_i) / (1 + sum_j exp(x_j))); the
learned per-head sinks of examples/gpt_oss.py generalise it. The extra key carries no value (LANGUAGE.md).
"""

import torch

import attnlang as al

NAME = "softmax_plus_one"
VARIANT = al.compile(mask="q_idx >= kv_idx", sink="0")


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
