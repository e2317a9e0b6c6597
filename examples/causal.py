"""Causal (autoregressive) attention: each query attends to itself and earlier keys.

From: the original Transformer decoder (Vaswani et al., 2017, "Attention Is All You Need").
"""

import torch

import attnlang as al

NAME = "causal"
VARIANT = al.compile(mask="q_idx >= kv_idx")


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
