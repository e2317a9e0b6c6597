"""Sliding window with attention sinks: causal local attention that always keeps the first few tokens.

From: StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"); the first
``sinks`` tokens stay visible to every later query, the rest is a causal window of ``window`` keys.
"""

import torch

import attnlang as al

NAME = "attention_sinks"
VARIANT = al.compile(mask="(kv_idx < sinks | q_idx - kv_idx < window) & q_idx >= kv_idx",
                     params={"sinks": 4, "window": 64})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
