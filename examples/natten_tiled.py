"""NATTEN neighbourhood attention on a canvas stored in static tiles: each pixel attends to a kernel_h x kernel_w
window, but tokens are laid out tile by tile (tile_h x tile_w pixels per tile, tiles in row-major order), so
that a query block of the kernel covers a compact patch of the image.

From: Neighborhood Attention Transformer (Hassani et al., 2023) and the NATTEN library's tiled layout;
attention-gym's ``generate_tiled_natten`` (``masks/natten.py``). Position -> (column, row): tile id
``pos // (tile_h * tile_w)`` gives the tile's row and column among ``width // tile_w`` tiles per row, the offset
inside the tile gives the pixel within it. The window is shifted inward at the borders (every pixel has exactly
kernel_h * kernel_w neighbours), rows bounded by the height and kernel_h, columns by the width and kernel_w, so a
non-square canvas (here 12 wide, 9 high) and a non-square kernel (5 wide, 3 high) are right.

Written with bindings: no string is built in Python.
"""

import torch

import attnlang as al

NAME = "natten_tiled"
WIDTH, HEIGHT, KERNEL_W, KERNEL_H, TILE_W, TILE_H = 12, 9, 5, 3, 4, 3
VARIANT = al.compile(
    mask="""tiles_per_row = width // tile_w
qt = q_idx // (tile_h * tile_w); qo = q_idx % (tile_h * tile_w)
kt = kv_idx // (tile_h * tile_w); ko = kv_idx % (tile_h * tile_w)
qx = qt % tiles_per_row * tile_w + qo % tile_w; qy = qt // tiles_per_row * tile_h + qo // tile_w
kx = kt % tiles_per_row * tile_w + ko % tile_w; ky = kt // tiles_per_row * tile_h + ko // tile_w
abs(clamp(qx, kernel_w // 2, width - 1 - kernel_w // 2) - kx) <= kernel_w // 2
  & abs(clamp(qy, kernel_h // 2, height - 1 - kernel_h // 2) - ky) <= kernel_h // 2""",
    params={"width": WIDTH, "height": HEIGHT, "kernel_w": KERNEL_W, "kernel_h": KERNEL_H, "tile_w": TILE_W,
            "tile_h": TILE_H})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): one canvas of WIDTH * HEIGHT pixels, whatever ``seq_len`` the demo asks for."""
    return WIDTH * HEIGHT, WIDTH * HEIGHT


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none: the sizes are compile-time parameters)."""
    return {}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, n, n))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: {WIDTH}x{HEIGHT} canvas in {TILE_W}x{TILE_H} tiles, {KERNEL_W}x{KERNEL_H} kernel, "
          f"out {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")
