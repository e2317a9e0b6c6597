"""Relative position bias: the score grows linearly with the query-key offset, ``score + (q_idx - kv_idx)``,
no mask.

From: the FlexAttention introduction (PyTorch blog, 2024, "FlexAttention: The Flexibility of PyTorch with the
Performance of FlashAttention", ``relative_positional``), attention-gym's first score_mod example; a learned
per-offset table is examples/t5_relative_bias.py, per-head slopes examples/alibi.py.
"""

import torch

import attnlang as al

NAME = "relative_position"
VARIANT = al.compile(score="score + (q_idx - kv_idx)")


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
