"""Sliding tile attention (STA), 2-D: an image of height x width pixels stored tile by tile (tile_h x tile_w
pixels per tile); each query tile attends to a kernel of whole tiles around it, shifted inward at the borders;
text tokens after the image attend to everything, and image tokens also attend to the text.

From: Fast Video Generation with Sliding Tile Attention (Zhang et al., 2025); attention-gym's
``generate_sta_mask_mod_2d`` (``masks/sta.py``). The kernel spans kernel_h // tile_h x kernel_w // tile_w tiles;
an even span reaches one tile further back than forward (left border span // 2, right border span // 2 - 1).
"""

import torch

import attnlang as al

NAME = "sta_2d"
HEIGHT, WIDTH, TILE_H, TILE_W, KERNEL_H, KERNEL_W, TEXT = 8, 12, 2, 4, 4, 8, 7
VARIANT = al.compile(
    mask="""n = height * width; tiles_w = width // tile_w; tiles_h = height // tile_h
span_h = kernel_h // tile_h; span_w = kernel_w // tile_w
left_h = span_h // 2; right_h = span_h // 2 + span_h % 2 - 1
left_w = span_w // 2; right_w = span_w // 2 + span_w % 2 - 1
qt = q_idx // (tile_h * tile_w); kt = kv_idx // (tile_h * tile_w)
ch = clamp(qt // tiles_w, left_h, tiles_h - 1 - right_h); cw = clamp(qt % tiles_w, left_w, tiles_w - 1 - right_w)
near = (ch - left_h <= kt // tiles_w & kt // tiles_w <= ch + right_h
        & cw - left_w <= kt % tiles_w & kt % tiles_w <= cw + right_w)
q_idx < n & kv_idx < n & near | q_idx < n & n <= kv_idx & kv_idx < n + text | q_idx >= n & kv_idx < n + text""",
    params={"height": HEIGHT, "width": WIDTH, "tile_h": TILE_H, "tile_w": TILE_W, "kernel_h": KERNEL_H,
            "kernel_w": KERNEL_W, "text": TEXT})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): the image's pixels and the text tokens."""
    return HEIGHT * WIDTH + TEXT, HEIGHT * WIDTH + TEXT


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none: the sizes are compile-time parameters)."""
    return {}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, n, n))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: {HEIGHT}x{WIDTH} image in {TILE_H}x{TILE_W} tiles, {KERNEL_H}x{KERNEL_W} kernel, {TEXT} text "
          f"tokens, out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
