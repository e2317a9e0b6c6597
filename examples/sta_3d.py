"""Sliding tile attention (STA), 3-D: a video of frames x height x width tokens stored tile by tile (cubes of
tile_t x tile_h x tile_w tokens); each query tile attends to a kernel of whole tiles around it in time, height
and width, shifted inward at the borders; text tokens after the video attend to everything, and video tokens
also attend to the text.

From: Fast Video Generation with Sliding Tile Attention (Zhang et al., 2025); attention-gym's
``generate_sta_mask_mod_3d`` (``masks/sta.py``). An even kernel span reaches one tile further back than forward.
"""

import torch

import attnlang as al

NAME = "sta_3d"
FRAMES, HEIGHT, WIDTH = 4, 4, 6
TILE_T, TILE_H, TILE_W = 2, 2, 3
KERNEL_T, KERNEL_H, KERNEL_W = 4, 2, 3
TEXT = 5
VARIANT = al.compile(
    mask="""n = frames * height * width
tiles_t = frames // tile_t; tiles_h = height // tile_h; tiles_w = width // tile_w
st = kernel_t // tile_t; sh = kernel_h // tile_h; sw = kernel_w // tile_w
lt = st // 2; rt = st // 2 + st % 2 - 1
lh = sh // 2; rh = sh // 2 + sh % 2 - 1
lw = sw // 2; rw = sw // 2 + sw % 2 - 1
qt = q_idx // (tile_t * tile_h * tile_w); kt = kv_idx // (tile_t * tile_h * tile_w)
ct = clamp(qt // (tiles_h * tiles_w), lt, tiles_t - 1 - rt)
ch = clamp(qt % (tiles_h * tiles_w) // tiles_w, lh, tiles_h - 1 - rh)
cw = clamp(qt % tiles_w, lw, tiles_w - 1 - rw)
kt_t = kt // (tiles_h * tiles_w); kt_h = kt % (tiles_h * tiles_w) // tiles_w; kt_w = kt % tiles_w
near = ct - lt <= kt_t & kt_t <= ct + rt & ch - lh <= kt_h & kt_h <= ch + rh & cw - lw <= kt_w & kt_w <= cw + rw
q_idx < n & kv_idx < n & near | q_idx < n & n <= kv_idx & kv_idx < n + text | q_idx >= n & kv_idx < n + text""",
    params={"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "tile_t": TILE_T, "tile_h": TILE_H, "tile_w": TILE_W,
            "kernel_t": KERNEL_T, "kernel_h": KERNEL_H, "kernel_w": KERNEL_W, "text": TEXT})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): the video's tokens and the text tokens."""
    n = FRAMES * HEIGHT * WIDTH + TEXT
    return n, n


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none: the sizes are compile-time parameters)."""
    return {}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, n, n))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: {FRAMES}x{HEIGHT}x{WIDTH} video in {TILE_T}x{TILE_H}x{TILE_W} tiles, {TEXT} text tokens, "
          f"out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
