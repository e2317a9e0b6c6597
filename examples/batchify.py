"""Batchify: the sequence is cut into groups of ``size`` tokens; attention stays inside a group, where an inner
mask (here causal) applies to the positions within the group.

From: attention-gym's ``batchify_mask_mod`` (``masks/batchify.py``), which wraps an inner mask_mod function. In
attnlang the inner mask reads bound names for the positions inside the group; two whole variants combine with
``&`` (``groups & causal``) when the inner mask reads the plain positions.
"""

import torch

import attnlang as al

NAME = "batchify"
SIZE = 12
VARIANT = al.compile(
    mask="qi = q_idx % size; ki = kv_idx % size\n"
         "q_idx // size == kv_idx // size & qi >= ki",
    params={"size": SIZE})


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    n = 100
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: groups of {SIZE}, causal inside, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
