"""NATTEN-style 2D neighbourhood attention on a flattened image: each pixel attends to a kernel_h x kernel_w window.

From: Neighborhood Attention Transformer (Hassani et al., 2023, "Neighborhood Attention Transformer", the NATTEN
library); attention-gym's ``masks/natten.py``. Tokens are the pixels of a ``height x width`` image in row-major
order (position = row * width + col). As in NATTEN the window is shifted inward at the borders, so every pixel
has exactly kernel_h * kernel_w neighbours (kernel sizes odd).

The variant is built for one image size: ``demo_lengths`` gives q_len = kv_len = height * width.
"""

import torch

import attnlang as al

NAME = "natten_2d"
HEIGHT, WIDTH, KERNEL_H, KERNEL_W = 16, 16, 5, 7
VARIANT = al.compile(
    mask="abs(clamp(q_idx // width, kernel_h // 2, height - 1 - kernel_h // 2) - kv_idx // width) <= kernel_h // 2"
         " & abs(clamp(q_idx % width, kernel_w // 2, width - 1 - kernel_w // 2) - kv_idx % width) <= kernel_w // 2",
    params={"height": HEIGHT, "width": WIDTH, "kernel_h": KERNEL_H, "kernel_w": KERNEL_W})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): one image of HEIGHT * WIDTH pixels, whatever ``seq_len`` the demo asks for."""
    return HEIGHT * WIDTH, HEIGHT * WIDTH


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; image and kernel sizes are compile-time parameters)."""
    return {}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v, **tensors(1, 4, n, n))
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: {HEIGHT}x{WIDTH} image, {KERNEL_H}x{KERNEL_W} kernel, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
