"""Graphormer spatial encoding: the tokens are a graph's nodes; each score gains a learnable bias per head and
shortest-path distance between the two nodes (distances past ``max_distance``, and unreachable pairs, share the
last bucket).

From: Do Transformers Really Perform Badly for Graph Representation? (Ying et al., 2021, Graphormer);
attention-gym's ``generate_graphormer_spatial_bias`` (``mods/graphormer.py``).
"""

import torch

import attnlang as al

NAME = "graphormer_spatial"
MAX_DISTANCE = 5
VARIANT = al.compile(score="score + spatial_bias[h, distance[b, q_idx, kv_idx]]")


def random_graphs(batch: int, nodes: int, seed: int = 0) -> torch.Tensor:
    """bool [batch, nodes, nodes]: symmetric random adjacency, sparse enough to give long shortest paths."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, nodes, nodes, generator=g) < 2.5 / nodes
    return (a | a.transpose(1, 2)) & ~torch.eye(nodes, dtype=torch.bool)


def shortest_paths(adjacency: torch.Tensor) -> torch.Tensor:
    """int64 [batch, n, n] hop counts by Floyd-Warshall; unreachable pairs get n."""
    n = adjacency.shape[-1]
    d = torch.where(adjacency, 1, n).long()
    d.diagonal(dim1=1, dim2=2).zero_()
    for k in range(n):
        d = torch.minimum(d, d[:, :, k:k + 1] + d[:, k:k + 1, :])
    return d.clamp(max=n)


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): one graph's nodes, at most 256 (the all-pairs shortest paths cost n^3)."""
    n = min(seq_len, 256)
    return n, n


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """distance: int64 [batch, n, n] shortest-path buckets in [0, MAX_DISTANCE + 1]; spatial_bias: float32
    [q_heads, MAX_DISTANCE + 2] (learnable in a model)."""
    assert q_len == kv_len, "self-attention over one graph's nodes"
    distance = shortest_paths(random_graphs(batch, q_len)).clamp(max=MAX_DISTANCE + 1)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(q_heads, MAX_DISTANCE + 2, generator=g)
    return {"distance": distance.to(device), "spatial_bias": bias.to(device)}


if __name__ == "__main__":
    n = 97
    q, k, v = (torch.randn(2, 4, n, 64) for _ in range(3))
    named = tensors(2, 4, n, n)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: 2 graphs of {n} nodes, distance buckets 0..{MAX_DISTANCE + 1}, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
