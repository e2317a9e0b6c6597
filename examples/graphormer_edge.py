"""Graphormer edge encoding: each score gains the mean, along the shortest path between the two nodes, of a
learnable bias per head, path position and edge type (paths truncated to their first ``max_path`` edges).

From: Do Transformers Really Perform Badly for Graph Representation? (Ying et al., 2021, Graphormer);
attention-gym's ``generate_graphormer_edge_bias`` (``mods/graphormer.py``). One bounded reduction over the path
positions: ``sum(where(n > i, edge_bias[h, i, path_type[b, q_idx, kv_idx, i]], 0.0) for i in range(max_path))``,
divided by the path's length ``n`` (at least 1).
"""

import torch

import attnlang as al

NAME = "graphormer_edge"
MAX_PATH, EDGE_TYPES = 4, 3
VARIANT = al.compile(
    score="n = path_len[b, q_idx, kv_idx]\n"
          "score + sum(where(n > i, edge_bias[h, i, path_type[b, q_idx, kv_idx, i]], 0.0) for i in range(max_path))"
          " / max(n, 1)",
    params={"max_path": MAX_PATH})


def paths(adjacency: torch.Tensor, edge_type: torch.Tensor, max_path: int):
    """(path_type int64 [batch, n, n, max_path], path_len int64 [batch, n, n]): the edge types along a shortest
    path from each node to each other (0 past the path's end) and min(hops, max_path) (0 if unreachable)."""
    batch, n, _ = adjacency.shape
    dist = torch.where(adjacency, 1, n + 1).long()
    dist.diagonal(dim1=1, dim2=2).zero_()
    hop = torch.where(adjacency, torch.arange(n).expand(batch, n, n), -1)  # first node after i towards j
    for k in range(n):
        via = dist[:, :, k:k + 1] + dist[:, k:k + 1, :]
        better = via < dist
        dist = torch.where(better, via, dist)
        hop = torch.where(better, hop[:, :, k:k + 1].expand(batch, n, n), hop)
    length = torch.where(dist > n, 0, dist).clamp(max=max_path)
    types = torch.zeros(batch, n, n, max_path, dtype=torch.long)
    bi = torch.arange(batch).view(batch, 1, 1)
    here = torch.arange(n).view(1, n, 1).expand(batch, n, n)
    there = torch.arange(n).view(1, 1, n).expand(batch, n, n)
    for step in range(max_path):
        on = step < length
        nxt = torch.where(on, hop[bi, here, there], here)
        types[..., step] = torch.where(on, edge_type[bi, here, nxt.clamp(min=0)], 0)
        here = nxt
    return types, length


def demo_lengths(seq_len: int) -> tuple[int, int]:
    """(q_len, kv_len): one graph's nodes, at most 256 (the all-pairs shortest paths cost n^3)."""
    n = min(seq_len, 256)
    return n, n


def tensors(batch: int, q_heads: int, q_len: int, kv_len: int, device="cpu") -> dict[str, torch.Tensor]:
    """path_type: int64 [batch, n, n, MAX_PATH] in [0, EDGE_TYPES); path_len: int64 [batch, n, n] in
    [0, MAX_PATH]; edge_bias: float32 [q_heads, MAX_PATH, EDGE_TYPES] (learnable in a model)."""
    assert q_len == kv_len, "self-attention over one graph's nodes"
    g = torch.Generator().manual_seed(0)
    a = torch.rand(batch, q_len, q_len, generator=g) < 2.5 / q_len
    adjacency = (a | a.transpose(1, 2)) & ~torch.eye(q_len, dtype=torch.bool)
    t = torch.randint(0, EDGE_TYPES, (batch, q_len, q_len), generator=g)
    edge_type = torch.minimum(t, t.transpose(1, 2))  # one type per undirected edge
    path_type, path_len = paths(adjacency, edge_type, MAX_PATH)
    bias = torch.randn(q_heads, MAX_PATH, EDGE_TYPES, generator=g)
    return {"path_type": path_type.to(device), "path_len": path_len.to(device), "edge_bias": bias.to(device)}


if __name__ == "__main__":
    n = 97
    q, k, v = (torch.randn(2, 4, n, 64) for _ in range(3))
    named = tensors(2, 4, n, n)
    out = VARIANT(q, k, v, **named)
    ref = al.reference(q, k, v, VARIANT, **named)
    print(f"{NAME}: 2 graphs of {n} nodes, paths of up to {MAX_PATH} edges, out {tuple(out.shape)}, "
          f"max |out - reference| = {(out - ref).abs().max():.2e}")
