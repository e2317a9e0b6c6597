"""Sandwich relative position bias: the inner product of the sinusoidal position embeddings of the query and the
key, sum_i cos((q_idx - kv_idx) * w_i) with w_i = 10000^(-2i / d_bar), scaled per head by H / (8 (h + 1))
(ALiBi-like compression ratios), added to the score.

From: Dissecting Transformer Length Extrapolation via the Lens of Receptive Field Analysis (Chi et al., 2023,
Sandwich); attention-gym's ``generate_sandwich_bias`` (``mods/sandwich.py``), which precomputes the sum as a table.
Here it is one bounded reduction with ``cos`` over the d_bar / 2 frequencies, no table.
"""

import torch

import attnlang as al

NAME = "sandwich"
HEADS, D_BAR = 4, 32
VARIANT = al.compile(
    score="bias = sum(cos(float(q_idx - kv_idx) * 10000.0 ** (-2.0 * i / d_bar)) for i in range(half))\n"
          "score + bias * heads / (8.0 * (h + 1))",
    mask="q_idx >= kv_idx",
    params={"d_bar": D_BAR, "half": D_BAR // 2, "heads": HEADS})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; the head count is the compile-time parameter HEADS)."""
    assert q_heads == HEADS, f"compiled for {HEADS} heads"
    return {}


if __name__ == "__main__":
    n = 97
    q, k, v = (torch.randn(1, HEADS, n, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: d_bar {D_BAR}, {HEADS} heads, causal, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
