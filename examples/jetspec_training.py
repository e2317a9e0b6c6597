"""JetSpec draft-head training mask: queries are sampled blocks of ``block`` tokens ([anchor, future_1, ...]);
keys are ``prefix`` verified tokens followed by the same blocks. Each query sees the whole prefix and, in its own
block only, the anchor and the positions up to itself.

From: JetSpec (Hao AI Lab; https://github.com/hao-ai-lab/JetSpec); attention-gym's
``generate_jetspec_training_mask_mod`` (``masks/jetspec.py``).
"""

import torch

import attnlang as al

NAME = "jetspec_training"
PREFIX, BLOCK, BLOCKS = 31, 6, 19
VARIANT = al.compile(
    mask="j = kv_idx - prefix\n"
         "kv_idx < prefix | j >= 0 & q_idx // block == j // block & j % block <= q_idx % block",
    params={"prefix": PREFIX, "block": BLOCK})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): BLOCKS sampled blocks as queries; the prefix and the blocks as keys."""
    return BLOCKS * BLOCK, PREFIX + BLOCKS * BLOCK


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    n, m = demo_lengths(0)
    q = torch.randn(1, 4, n, 64)
    k, v = (torch.randn(1, 4, m, 64) for _ in range(2))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: {BLOCKS} blocks of {BLOCK} after a {PREFIX}-token prefix, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
