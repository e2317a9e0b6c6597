"""Sparse VideoGen temporal head: a video token attends to the tokens at nearby positions within their frames, in
every frame (``width * frame // frames`` positions around its own); the prompt attends to everything and
everything attends to the prompt.

From: Sparse VideoGen: Accelerating Video Diffusion Transformers with Spatial-Temporal Sparsity (Xi et al., 2025);
attention-gym's ``generate_temporal_head_mask_mod`` (``masks/svg.py``).
"""

import torch

import attnlang as al

NAME = "svg_temporal"
PROMPT, FRAMES, FRAME, WIDTH = 26, 5, 24, 2
VARIANT = al.compile(
    mask="qt = (q_idx - prompt) % frame; kt = (kv_idx - prompt) % frame\n"
         "q_idx < prompt | kv_idx < prompt | abs(qt - kt) < width * frame // frames",
    params={"prompt": PROMPT, "frame": FRAME, "frames": FRAMES, "width": WIDTH})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): the prompt and the video's tokens."""
    return PROMPT + FRAMES * FRAME, PROMPT + FRAMES * FRAME


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: {PROMPT} prompt + {FRAMES} x {FRAME} video tokens, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
