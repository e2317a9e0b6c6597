"""Dilated sliding window: keys within ``window`` positions on either side, but only every ``dilation``-th one.

From: Longformer's dilated sliding window (Beltagy et al., 2020, "Longformer: The Long-Document Transformer",
section 3.1); attention-gym's ``masks/dilated_sliding_window.py`` (bidirectional, as there).
"""

import torch

import attnlang as al

NAME = "dilated_sliding_window"
VARIANT = al.compile(mask="abs(q_idx - kv_idx) <= window & (q_idx - kv_idx) % dilation == 0",
                     params={"window": 32, "dilation": 4})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; window and dilation are compile-time parameters)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
