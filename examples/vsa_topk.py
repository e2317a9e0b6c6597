"""Video sparse attention (VSA), its fine pass: tokens are grouped into tiles of ``tile`` tokens; each query tile
attends to the ``top_k`` key tiles a coarse pass picked for it (per batch and head), and never to the padding
that fills the last tile.

From: VSA: Faster Video Diffusion with Trainable Sparse Attention (Zhang et al., 2025, FastVideo);
attention-gym's ``generate_vsa_mask_mod`` (``masks/vsa.py``). One bounded reduction over the top-k list:
``any(topk[b, h, q_idx // tile, i] == kv_idx // tile for i in range(top_k))``; ``real[t]`` is the number of real
tokens in tile t.
"""

import torch

import attnlang as al

NAME = "vsa_topk"
TILE, TOP_K = 8, 4
VARIANT = al.compile(
    mask="kt = kv_idx // tile\n"
         "any(topk[b, h, q_idx // tile, i] == kt for i in range(top_k)) & kv_idx % tile < real[kt]",
    params={"tile": TILE, "top_k": TOP_K})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): ``seq_len`` tokens padded up to whole tiles."""
    n = -(-seq_len // TILE) * TILE
    return n, n


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """topk: int64 [batch, q_heads, q_tiles, TOP_K], distinct key tiles per query tile (the coarse pass's pick,
    random here); real: int64 [kv_tiles], real tokens per tile (the last tile is short when the unpadded length
    does not divide)."""
    g = torch.Generator().manual_seed(0)
    q_tiles, kv_tiles = q_len // TILE, kv_len // TILE
    topk = torch.stack([torch.randperm(kv_tiles, generator=g)[:TOP_K] for _ in range(batch * q_heads * q_tiles)])
    real = torch.full((kv_tiles,), TILE, dtype=torch.int64)
    real[-1] = TILE - 1  # one padding token in the last tile
    return {"topk": topk.view(batch, q_heads, q_tiles, TOP_K).to(device), "real": real.to(device)}


if __name__ == "__main__":
    n, _ = demo_lengths(250)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    named = tensors(1, 4, n, n)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: {n} tokens in tiles of {TILE}, top {TOP_K} tiles per query tile, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
