"""Sliding-window (local) causal attention: each query sees itself and the ``window - 1`` keys before it.

From: Longformer (Beltagy et al., 2020, "Longformer: The Long-Document Transformer") and Mistral 7B
(Jiang et al., 2023); attention-gym's ``masks/sliding_window.py``.
"""

import torch

import attnlang as al

NAME = "sliding_window"
VARIANT = al.compile(mask="0 <= q_idx - kv_idx < window", params={"window": 64})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; the window is a compile-time parameter)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
