"""Chunked (block-diagonal causal) attention: tokens attend causally only inside their own chunk.

From: Llama 4's local attention layers (Meta, 2025; ``attention_chunk_size = 8192`` in transformers'
Llama4TextConfig), also called block-diagonal or blockwise-local attention; attention-gym lists it as a
block-diagonal mask.
"""

import torch

import attnlang as al

NAME = "chunked"
VARIANT = al.compile(mask="q_idx // chunk == kv_idx // chunk & q_idx >= kv_idx", params={"chunk": 64})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; the chunk size is a compile-time parameter)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
