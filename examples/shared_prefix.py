"""Shared prefix: packed documents where several continuations share one prompt without copying it. Every token
attends causally within its own document; a continuation also attends to all of its prompt document.

From: attention-gym's ``generate_shared_prefix_mask_mod`` (``masks/shared_prefix.py``), as used for grouped
sampling (several responses to one prompt) in RL fine-tuning. ``doc[i]``: the document of token i; ``start[d]``:
its first position (``start`` has one entry more, the end); ``prompt_of[d]``: d's prompt document (a prompt is
its own).
"""

import torch

import attnlang as al

NAME = "shared_prefix"
LENGTHS = [9, 4, 6, 3, 12, 5, 5, 7]    # two prompts (documents 0 and 4), each followed by three continuations
PROMPT_OF = [0, 0, 0, 0, 4, 4, 4, 4]
VARIANT = al.compile(
    mask="""d = doc[q_idx]; p = prompt_of[d]
kv_idx >= start[d] & q_idx >= kv_idx | d != p & kv_idx >= start[p] & kv_idx < start[p + 1]""")


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): the packed documents."""
    return sum(LENGTHS), sum(LENGTHS)


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """doc: int64 [q_len] document ids; start: int64 [documents + 1] offsets; prompt_of: int64 [documents]."""
    lengths = torch.tensor(LENGTHS)
    start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), lengths)
    return {"doc": doc.to(device), "start": start.to(device), "prompt_of": torch.tensor(PROMPT_OF).to(device)}


if __name__ == "__main__":
    n, _ = demo_lengths(0)
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    named = tensors(1, 4, n, n)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: {len(LENGTHS)} documents sharing 2 prompts, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
