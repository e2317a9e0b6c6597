"""Stand-alone self-attention (SASA) on a flattened image: each pixel attends to the pixels within ``window`` rows
and ``window`` columns of it; unlike NATTEN (examples/natten_2d.py) the window is not shifted inward at the
borders, so border pixels see fewer neighbours.

From: Ramachandran et al., 2019, "Stand-Alone Self-Attention in Vision Models"; attention-gym's FlexAttention
notebook (``examples/flex_attn.ipynb``, ``sasa_mask``). Pixels in row-major order (position = row * width + col),
here on a non-square canvas; the variant is built for one image size (``demo_lengths``).
"""

import torch

import attnlang as al

NAME = "sasa_2d"
HEIGHT, WIDTH, WINDOW = 9, 14, 2
VARIANT = al.compile(
    mask="abs(q_idx // width - kv_idx // width) <= window & abs(q_idx % width - kv_idx % width) <= window",
    params={"width": WIDTH, "window": WINDOW})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): one image of HEIGHT * WIDTH pixels, whatever ``seq_len`` the demo asks for."""
    return HEIGHT * WIDTH, HEIGHT * WIDTH


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none; the width and window are compile-time parameters)."""
    return {}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: {HEIGHT}x{WIDTH} image, window {WINDOW}, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
