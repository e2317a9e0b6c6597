"""Vision cross-attention (Flamingo): text tokens (queries) attend to the tokens of the images (keys) whose
interval of text they belong to; image i's ``image_len`` tokens are seen by text positions
[interval[i, 0], interval[i, 1]).

From: Flamingo: a Visual Language Model for Few-Shot Learning (Alayrac et al., 2022); attention-gym's
``generate_vision_cross_attention_mask_mod`` (``masks/flamingo.py``).
"""

import torch

import attnlang as al

NAME = "vision_cross_attention"
IMAGES, IMAGE_LEN = 5, 8
VARIANT = al.compile(
    mask="image = kv_idx // image_len; interval[image, 0] <= q_idx & q_idx < interval[image, 1]",
    params={"image_len": IMAGE_LEN})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): ``seq_len`` text tokens; IMAGES images of IMAGE_LEN tokens."""
    return seq_len, IMAGES * IMAGE_LEN


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """interval: int64 [IMAGES, 2], the text positions each image is visible from (overlapping, as images
    precede the text that follows them until the next image)."""
    cuts = torch.linspace(0, q_len, IMAGES + 1).long()
    interval = torch.stack([cuts[:-1], cuts[1:]], 1)
    interval[1, 0] = interval[0, 0] + 1  # image 1 is also seen by most of image 0's text
    return {"interval": interval.to(device)}


if __name__ == "__main__":
    n, m = demo_lengths(60)
    q = torch.randn(1, 4, n, 64)
    k, v = (torch.randn(1, 4, m, 64) for _ in range(2))
    named = tensors(1, 4, n, m)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: {n} text tokens, {IMAGES} images of {IMAGE_LEN} tokens, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
