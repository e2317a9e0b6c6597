"""Sandwich relative position bias: the inner product of the sinusoidal position embeddings of the query and the
key, sum_i cos((q_idx - kv_idx) * w_i) with w_i = 10000^(-2i / d_bar), scaled per head by ratio[h] =
H / (8 (h + 1)) (ALiBi-like compression ratios), added to the score.

From: Dissecting Transformer Length Extrapolation via the Lens of Receptive Field Analysis (Chi et al., 2023,
Sandwich); attention-gym's ``generate_sandwich_bias`` (``mods/sandwich.py``), which precomputes the sum as a table.
Here it is one bounded reduction with ``cos`` over the d_bar / 2 frequencies, no table.
"""

import torch

import attnlang as al

NAME = "sandwich"
D_BAR = 32
VARIANT = al.compile(
    score="bias = sum(cos(float(q_idx - kv_idx) * 10000.0 ** (-2.0 * i / d_bar)) for i in range(half))\n"
          "score + bias * ratio[h]",
    mask="q_idx >= kv_idx",
    params={"d_bar": D_BAR, "half": D_BAR // 2})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """ratio: float32 [q_heads], H / (8 (h + 1)) for head h of H."""
    return {"ratio": (q_heads / (8.0 * torch.arange(1, q_heads + 1, dtype=torch.float32))).to(device)}


if __name__ == "__main__":
    n = 97
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, n, n))
    ref = al.reference(q, k, v, VARIANT, **tensors(1, 4, n, n))
    print(f"{NAME}: d_bar {D_BAR}, 4 heads, causal, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
