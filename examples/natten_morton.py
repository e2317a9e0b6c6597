"""NATTEN neighbourhood attention on a canvas stored in Morton (Z-curve) order: position p holds the pixel whose
column bits are p's even bits and whose row bits are p's odd bits, so that nearby pixels sit at nearby positions.

From: Neighborhood Attention Transformer (Hassani et al., 2023); attention-gym's ``generate_morton_natten``
(``masks/natten.py``), which decodes the curve with hand-written bit interleaving. Here one bounded reduction with
bit operations per coordinate: ``x = sum((p >> 2 * i & 1) << i for i in range(bits))``. The canvas is 16 wide and
8 high (Morton codes of a 2^a x 2^b canvas, a = b or b + 1, fill 0 .. width * height - 1); the kernel is 5 wide
and 3 high, shifted inward at the borders, rows bounded by the height and kernel_h, columns by the width and
kernel_w.
"""

import torch

import attnlang as al

NAME = "natten_morton"
WIDTH, HEIGHT, KERNEL_W, KERNEL_H, BITS = 16, 8, 5, 3, 4
VARIANT = al.compile(
    mask="""qx = sum((q_idx >> 2 * i & 1) << i for i in range(bits))
qy = sum((q_idx >> 2 * i + 1 & 1) << i for i in range(bits))
kx = sum((kv_idx >> 2 * i & 1) << i for i in range(bits))
ky = sum((kv_idx >> 2 * i + 1 & 1) << i for i in range(bits))
abs(clamp(qx, kernel_w // 2, width - 1 - kernel_w // 2) - kx) <= kernel_w // 2
  & abs(clamp(qy, kernel_h // 2, height - 1 - kernel_h // 2) - ky) <= kernel_h // 2""",
    params={"width": WIDTH, "height": HEIGHT, "kernel_w": KERNEL_W, "kernel_h": KERNEL_H, "bits": BITS})


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
    print(f"{NAME}: {WIDTH}x{HEIGHT} canvas in Morton order, {KERNEL_W}x{KERNEL_H} kernel, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
