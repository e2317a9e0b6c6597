"""Checkerboard score modification: scores of pairs an odd distance apart are halved, of pairs an even distance
apart doubled; no mask.

From: attention-gym's FlexAttention notebook (``examples/flex_attn.ipynb``, "Basic Usage": ``checkerboard``), a
toy score_mod that shows a score depending on positions.
"""

import torch

import attnlang as al

NAME = "checkerboard"
VARIANT = al.compile(score="where(abs(kv_idx - q_idx) % 2 == 1, score * 0.5, score * 2.0)")


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
