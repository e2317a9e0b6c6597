"""ALiBi: a per-head linear penalty on the query-key distance, causal.

From: Press, Smith and Lewis, 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation" (ALiBi); attention-gym's ``mods/alibi.py``. The head slopes are the paper's geometric sequence
``2^(-8 (h + 1) / H)``, passed as a float tensor ``slope`` of shape [H].
"""

import torch

import attnlang as al

NAME = "alibi"
VARIANT = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx")


def alibi_slopes(heads: int, device="cpu") -> torch.Tensor:
    """float32 [heads]: 2^(-8 (h + 1) / heads) for h = 0 .. heads - 1."""
    return torch.exp2(-8.0 * torch.arange(1, heads + 1, dtype=torch.float32, device=device) / heads)


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """``slope``: float32 [q_heads], the ALiBi slope of each query head."""
    return {"slope": alibi_slopes(q_heads, device)}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    named = tensors(1, 4, 256, 256)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
