"""Block diffusion (BD3-LM) training mask over the noised sequence x_t (positions [0, n)) followed by the clean
sequence x_0 (positions [n, 2n)), both cut into blocks of ``block`` tokens: noised tokens attend within their own
noised block and to clean tokens of strictly earlier blocks; clean tokens attend causally by block to clean
tokens; clean tokens never see noised ones.

From: Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models (Arriola et al., 2025,
section 3.1); attention-gym's ``generate_block_diffusion_mask`` (``masks/block_diffusion.py``).
"""

import torch

import attnlang as al

NAME = "block_diffusion"
N, BLOCK = 75, 8
VARIANT = al.compile(
    mask="""q_noised = q_idx < n; kv_noised = kv_idx < n
qb = q_idx % n // block; kb = kv_idx % n // block
qb == kb & q_noised == kv_noised | qb > kb & q_noised & ~kv_noised | qb >= kb & ~q_noised & ~kv_noised""",
    params={"n": N, "block": BLOCK})


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): the noised and the clean sequence, N tokens each."""
    return 2 * N, 2 * N


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """The named tensors this variant reads (none)."""
    return {}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    out = VARIANT(q, k, v)
    ref = al.reference(q, k, v, VARIANT)
    print(f"{NAME}: 2 x {N} tokens in blocks of {BLOCK}, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
