"""Local attention plus global tokens: a bidirectional window, and a few tokens that see and are seen by all.

From: Longformer's global attention (Beltagy et al., 2020, "Longformer: The Long-Document Transformer", e.g. [CLS]
and question tokens) and BigBird's global tokens (Zaheer et al., 2020, "Big Bird: Transformers for Longer
Sequences"); the first ``globals`` positions are global, every other token sees ``window`` keys on each side.
"""

import torch

import attnlang as al

NAME = "global_tokens"
VARIANT = al.compile(mask="q_idx < globals | kv_idx < globals | abs(q_idx - kv_idx) <= window",
                     params={"globals": 4, "window": 32})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; globals and window are compile-time parameters)."""
    return {}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, 256, 256))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
