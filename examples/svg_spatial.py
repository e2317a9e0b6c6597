"""Sparse VideoGen spatial head: video tokens (``frames`` frames of ``frame`` tokens after a ``prompt``) attend to
the tokens within ``width`` frames of themselves (the band rounded down to a multiple of ``round_to`` for the
kernel's tiles); the prompt attends to everything and everything attends to the prompt (and, with ``sink``, to the
first frame too).

From: Sparse VideoGen: Accelerating Video Diffusion Transformers with Spatial-Temporal Sparsity (Xi et al., 2025);
attention-gym's ``generate_spatial_head_mask_mod`` (``masks/svg.py``).
"""

import torch

import attnlang as al

NAME = "svg_spatial"
PROMPT, FRAMES, FRAME, WIDTH, ROUND = 26, 5, 24, 2, 16
VARIANT = al.compile(
    mask="band = width * frame // round_to * round_to\n"
         "kv_idx < where(sink, prompt + frame, prompt) | q_idx < prompt | abs(q_idx - kv_idx) < band",
    params={"prompt": PROMPT, "frame": FRAME, "width": WIDTH, "round_to": ROUND, "sink": True})


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
