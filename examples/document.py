"""Document masking for packed sequences: several documents share one row, each attends causally only to itself.

From: sequence packing in LLM pre-training (e.g. Llama 3, Krell et al., 2021, "Efficient Sequence Packing without
Cross-contamination"); attention-gym's ``masks/document_mask.py``. ``doc`` holds one document id per position.
"""

import torch

import attnlang as al

NAME = "document"
VARIANT = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")


def packed_document_ids(length: int, num_docs: int = 5, seed: int = 0, device="cpu") -> torch.Tensor:
    """int64 [length]: ids 0, 0, ..., 1, 1, ... of ``min(num_docs, length)`` documents of different, seeded lengths."""
    num_docs = max(1, min(num_docs, length))
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(length - 1, generator=g)[:num_docs - 1] + 1  # where a new document starts
    starts = torch.zeros(length, dtype=torch.int64)
    starts[cuts] = 1
    return torch.cumsum(starts, 0).to(device)


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """``doc``: int64 [max(q_len, kv_len)], the document id of each position (self-attention: q_len == kv_len)."""
    return {"doc": packed_document_ids(max(q_len, kv_len), device=device)}


if __name__ == "__main__":
    q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
    named = tensors(1, 4, 256, 256)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    lengths = torch.bincount(named["doc"]).tolist()
    print(f"{NAME}: documents of lengths {lengths}, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
