"""Prefix LM: the first ``prefix`` tokens are seen by every query (bidirectional prefix), the rest is causal.

From: T5's prefix-LM objective (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer"), UniLM (Dong et al., 2019) and PaliGemma's image+prompt prefix; attention-gym's
``masks/prefix_lm.py``.
"""

import torch

import attnlang as al

NAME = "prefix_lm"
VARIANT = al.compile(mask="kv_idx < prefix | q_idx >= kv_idx", params={"prefix": 48})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; the prefix length is a compile-time parameter)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
