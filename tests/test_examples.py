"""The gallery: every examples/*.py runs as a script, keeps the file contract, and matches a dense float64
computation written here, independently of attnlang, for its variant."""

from __future__ import annotations

import importlib.util
import inspect
import math
import runpy
from pathlib import Path

import pytest
import torch

import attnlang as al

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "__init__.py")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"gallery_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- the independent definitions: (score transform, allowed) on dense [B, H, Sq, Skv] grids -----
# Each takes the example module (for its parameters and tensors) and the grids b, h, i (query), j (key),
# and returns (fn(s) -> s', allowed bool tensor). Written from each variant's paper/docstring, not from VARIANT.

def _plain(allowed):
    return (lambda s: s), allowed


def _causal(m, named, b, h, i, j, Sq, Skv):
    return _plain(i >= j)


def _sliding_window(m, named, b, h, i, j, Sq, Skv):
    w = m.VARIANT.params["window"]
    return _plain((i - j >= 0) & (i - j < w))


def _alibi(m, named, b, h, i, j, Sq, Skv):
    H = named["slope"].shape[0]
    slopes = torch.tensor([2.0 ** (-8.0 * (x + 1) / H) for x in range(H)], dtype=torch.float64)
    return (lambda s: s + slopes[h] * (j - i)), i >= j


def _softcap(m, named, b, h, i, j, Sq, Skv):
    cap = m.VARIANT.params["cap"]
    return (lambda s: cap * torch.tanh(s / cap)), i >= j


def _document(m, named, b, h, i, j, Sq, Skv):
    doc = named["doc"]
    lengths = torch.bincount(doc).tolist()
    assert len(lengths) >= 3 and len(set(lengths)) >= 2, f"want several documents of different lengths: {lengths}"
    return _plain((doc[i] == doc[j]) & (i >= j))


def _prefix_lm(m, named, b, h, i, j, Sq, Skv):
    return _plain((j < m.VARIANT.params["prefix"]) | (i >= j))


def _decode_causal(m, named, b, h, i, j, Sq, Skv):
    return _plain(j - (Skv - Sq) <= i)  # query i sits at absolute position i + Skv - Sq


def _chunked(m, named, b, h, i, j, Sq, Skv):
    c = m.VARIANT.params["chunk"]
    return _plain((torch.div(i, c, rounding_mode="floor") == torch.div(j, c, rounding_mode="floor")) & (i >= j))


def _dilated_sliding_window(m, named, b, h, i, j, Sq, Skv):
    w, d = m.VARIANT.params["window"], m.VARIANT.params["dilation"]
    dist = (i - j).abs()
    return _plain((dist <= w) & (dist % d == 0))


def _attention_sinks(m, named, b, h, i, j, Sq, Skv):
    sinks, w = m.VARIANT.params["sinks"], m.VARIANT.params["window"]
    return _plain((i >= j) & ((j < sinks) | (i - j < w)))


def _global_tokens(m, named, b, h, i, j, Sq, Skv):
    g, w = m.VARIANT.params["globals"], m.VARIANT.params["window"]
    return _plain((i < g) | (j < g) | ((i - j).abs() <= w))


def _prefix_lm_document(m, named, b, h, i, j, Sq, Skv):
    doc, prefix = named["doc"].tolist(), named["prefix_len"].tolist()
    start = {}
    for pos, d in enumerate(doc):
        start.setdefault(d, pos)
    allowed = torch.zeros(Sq, Skv, dtype=torch.bool)
    for qi in range(Sq):
        for kj in range(Skv):
            same = doc[qi] == doc[kj]
            in_prefix = kj - start[doc[kj]] < prefix[doc[kj]]
            allowed[qi, kj] = same and (in_prefix or kj <= qi)
    return _plain(allowed.view(1, 1, Sq, Skv))


def _t5_bucket(relative: int, num_buckets: int, max_distance: int) -> int:
    """T5Attention._relative_position_bucket, bidirectional, one position at a time in float64."""
    num_buckets //= 2
    bucket = num_buckets if relative > 0 else 0
    n = abs(relative)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


def _t5_relative_bias(m, named, b, h, i, j, Sq, Skv):
    nb, md = m.VARIANT.params["num_buckets"], m.VARIANT.params["max_distance"]
    buckets = torch.tensor([[_t5_bucket(kj - qi, nb, md) for kj in range(Skv)] for qi in range(Sq)])
    bias = named["bias"].to(torch.float64)[:, buckets]  # [H, Sq, Skv]
    return (lambda s: s + bias.unsqueeze(0)), torch.ones(1, 1, Sq, Skv, dtype=torch.bool)


def _natten_2d(m, named, b, h, i, j, Sq, Skv):
    H, W, kh, kw = (m.VARIANT.params[n] for n in ("height", "width", "kernel_h", "kernel_w"))
    allowed = torch.zeros(Sq, Skv, dtype=torch.bool)
    for qi in range(Sq):
        row, col = divmod(qi, W)
        r0 = min(max(row - kh // 2, 0), H - kh)  # the window's first row, shifted inward at the border
        c0 = min(max(col - kw // 2, 0), W - kw)
        for r in range(r0, r0 + kh):
            for c in range(c0, c0 + kw):
                allowed[qi, r * W + c] = True
    assert bool((allowed.sum(1) == kh * kw).all())
    return _plain(allowed.view(1, 1, Sq, Skv))


# ----- attention-gym's generators (issue 20): loops over positions, Python ints, no attnlang -----

def _mask_from(fn, Sq, Skv):
    allowed = torch.tensor([[bool(fn(qi, kj)) for kj in range(Skv)] for qi in range(Sq)])
    return _plain(allowed.view(1, 1, Sq, Skv))


def _window(center, size, extent):
    """The first cell of a size-wide window around ``center``, shifted inward to stay inside [0, extent)."""
    return min(max(center - size // 2, 0), extent - size)


def _natten_by_coordinates(coords, W, H, kw, kh, Sq, Skv):
    def allowed(qi, kj):
        (qx, qy), (kx, ky) = coords(qi), coords(kj)
        x0, y0 = _window(qx, kw, W), _window(qy, kh, H)
        return x0 <= kx < x0 + kw and y0 <= ky < y0 + kh
    fn, mask = _mask_from(allowed, Sq, Skv)
    assert bool((mask.sum(-1) == kw * kh).all())  # every pixel has a whole kernel of neighbours
    return fn, mask


def _natten_tiled(m, named, b, h, i, j, Sq, Skv):
    W, H, kw, kh, tw, th = (m.VARIANT.params[n] for n in ("width", "height", "kernel_w", "kernel_h", "tile_w",
                                                          "tile_h"))
    assert W != H and kw != kh  # the non-square case attention-gym's plain NATTEN gets wrong

    def coords(pos):
        tile, offset = divmod(pos, tw * th)
        tile_row, tile_col = divmod(tile, W // tw)
        row, col = divmod(offset, tw)
        return tile_col * tw + col, tile_row * th + row
    assert sorted(coords(p) for p in range(W * H)) == sorted((x, y) for x in range(W) for y in range(H))
    return _natten_by_coordinates(coords, W, H, kw, kh, Sq, Skv)


def _natten_morton(m, named, b, h, i, j, Sq, Skv):
    W, H, kw, kh = (m.VARIANT.params[n] for n in ("width", "height", "kernel_w", "kernel_h"))

    def coords(pos):
        bits = format(pos, "016b")[::-1]  # least significant first: even bits are x, odd bits are y
        return int(bits[0::2][::-1], 2), int(bits[1::2][::-1], 2)
    assert sorted(coords(p) for p in range(W * H)) == sorted((x, y) for x in range(W) for y in range(H))
    return _natten_by_coordinates(coords, W, H, kw, kh, Sq, Skv)


def _sta_window(q_tile, span, tiles):
    """Tiles a query tile's kernel covers: span tiles, one more behind than ahead when even, shifted inward."""
    behind = span // 2
    ahead = span - 1 - behind
    center = min(max(q_tile, behind), tiles - 1 - ahead)
    return range(center - behind, center + ahead + 1)


def _sta(dims, tiles, kernel, text, Sq, Skv):
    n = math.prod(dims)
    tile_numel = math.prod(tiles)
    counts = [d // t for d, t in zip(dims, tiles)]

    def tile_coords(pos):
        tile = pos // tile_numel
        out = []
        for c in reversed(counts):
            tile, r = divmod(tile, c)
            out.append(r)
        return out[::-1]

    def allowed(qi, kj):
        if qi >= n:
            return kj < n + text
        if kj >= n:
            return kj < n + text
        qc, kc = tile_coords(qi), tile_coords(kj)
        return all(kc[a] in _sta_window(qc[a], kernel[a] // tiles[a], counts[a]) for a in range(len(dims)))
    return _mask_from(allowed, Sq, Skv)


def _sta_2d(m, named, b, h, i, j, Sq, Skv):
    p = m.VARIANT.params
    return _sta((p["height"], p["width"]), (p["tile_h"], p["tile_w"]), (p["kernel_h"], p["kernel_w"]), p["text"],
                Sq, Skv)


def _sta_3d(m, named, b, h, i, j, Sq, Skv):
    p = m.VARIANT.params
    return _sta((p["frames"], p["height"], p["width"]), (p["tile_t"], p["tile_h"], p["tile_w"]),
                (p["kernel_t"], p["kernel_h"], p["kernel_w"]), p["text"], Sq, Skv)


def _vsa_topk(m, named, b, h, i, j, Sq, Skv):
    t = m.VARIANT.params["tile"]
    topk, real = named["topk"], named["real"]
    B, H = topk.shape[:2]
    allowed = torch.zeros(B, H, Sq, Skv, dtype=torch.bool)
    for bb in range(B):
        for hh in range(H):
            for qi in range(Sq):
                chosen = set(topk[bb, hh, qi // t].tolist())
                for kj in range(Skv):
                    allowed[bb, hh, qi, kj] = kj // t in chosen and kj % t < int(real[kj // t])
    return _plain(allowed)


def _block_diffusion(m, named, b, h, i, j, Sq, Skv):
    n, block = m.VARIANT.params["n"], m.VARIANT.params["block"]

    def allowed(qi, kj):
        q_clean, k_clean = qi >= n, kj >= n
        qb, kb = (qi - n * q_clean) // block, (kj - n * k_clean) // block
        if not q_clean and not k_clean:
            return qb == kb                      # block diagonal among noised tokens
        if not q_clean and k_clean:
            return kb < qb                       # noised -> clean tokens of strictly earlier blocks
        if q_clean and k_clean:
            return kb <= qb                      # clean tokens: block causal
        return False                             # clean tokens never see noised ones
    return _mask_from(allowed, Sq, Skv)


def _jetspec_tree(m, named, b, h, i, j, Sq, Skv):
    prefix = m.VARIANT.params["prefix"]
    par = m.parents(Sq)

    def on_path(node, other):
        while node != -1:
            if node == other:
                return True
            node = par[node]
        return False
    return _mask_from(lambda qi, kj: kj < prefix or on_path(qi, kj - prefix), Sq, Skv)


def _jetspec_training(m, named, b, h, i, j, Sq, Skv):
    prefix, block = m.VARIANT.params["prefix"], m.VARIANT.params["block"]

    def allowed(qi, kj):
        if kj < prefix:
            return True
        qb, qo = divmod(qi, block)
        kb, ko = divmod(kj - prefix, block)
        return qb == kb and ko <= qo
    return _mask_from(allowed, Sq, Skv)


def _shared_prefix(m, named, b, h, i, j, Sq, Skv):
    bounds, pos = [], 0
    for n in m.LENGTHS:
        bounds.append((pos, pos + n))
        pos += n
    doc_of = [d for d, n in enumerate(m.LENGTHS) for _ in range(n)]

    def allowed(qi, kj):
        d = doc_of[qi]
        if bounds[d][0] <= kj <= qi:
            return True  # causal inside the token's own document
        prompt = m.PROMPT_OF[d]
        return prompt != d and bounds[prompt][0] <= kj < bounds[prompt][1]  # a continuation sees its whole prompt
    return _mask_from(allowed, Sq, Skv)


def _vision_cross_attention(m, named, b, h, i, j, Sq, Skv):
    per_image = m.VARIANT.params["image_len"]
    spans = named["interval"].tolist()
    return _mask_from(lambda qi, kj: spans[kj // per_image][0] <= qi < spans[kj // per_image][1], Sq, Skv)


def _graphormer_spatial(m, named, b, h, i, j, Sq, Skv):
    dist, table = named["distance"], named["spatial_bias"].double()
    assert int(dist.max()) == m.MAX_DISTANCE + 1 and int(dist.min()) == 0  # far pairs and the diagonal
    bias = table[:, dist]                 # [H, B, N, N]
    return (lambda s: s + bias.permute(1, 0, 2, 3)), torch.ones(1, 1, Sq, Skv, dtype=torch.bool)


def _graphormer_edge(m, named, b, h, i, j, Sq, Skv):
    types, lengths, table = named["path_type"], named["path_len"], named["edge_bias"].double()
    B, H = types.shape[0], table.shape[0]
    assert int(lengths.max()) == m.MAX_PATH and int(lengths.min()) == 0
    bias = torch.zeros(B, H, Sq, Skv, dtype=torch.float64)
    for hh in range(H):
        for step in range(m.MAX_PATH):
            term = table[hh, step][types[..., step]]               # [B, N, N]
            bias[:, hh] += torch.where(lengths > step, term, 0.0)
    bias = bias / lengths.clamp(min=1).unsqueeze(1)
    return (lambda s: s + bias), torch.ones(1, 1, Sq, Skv, dtype=torch.bool)


def _mla_rope_bias(m, named, b, h, i, j, Sq, Skv):
    scale = m.VARIANT.params["rope_scale"]
    bias = scale * torch.einsum("bhqr,bkr->bhqk", named["q_rope"].double(), named["k_rope"].double())
    return (lambda s: s + bias), torch.ones(1, 1, Sq, Skv, dtype=torch.bool)


def _sandwich(m, named, b, h, i, j, Sq, Skv):
    p = m.VARIANT.params
    w = torch.tensor([10000.0 ** (-2.0 * t / p["d_bar"]) for t in range(p["d_bar"] // 2)], dtype=torch.float64)
    rel = (i - j).double().unsqueeze(-1) * w                      # [1, 1, Sq, Skv, d_bar / 2]
    ratio = named["ratio"].double()
    H = ratio.shape[0]
    torch.testing.assert_close(ratio, H / (8.0 * torch.arange(1, H + 1, dtype=torch.float64)))  # float32-rounded
    bias = torch.cos(rel).sum(-1) * ratio[h]
    return (lambda s: s + bias), i >= j


def _svg_spatial(m, named, b, h, i, j, Sq, Skv):
    p = m.VARIANT.params
    band = (p["width"] * p["frame"]) // p["round_to"] * p["round_to"]
    first_columns = p["prompt"] + (p["frame"] if p["sink"] else 0)
    return _mask_from(lambda qi, kj: kj < first_columns or qi < p["prompt"] or abs(qi - kj) < band, Sq, Skv)


def _svg_temporal(m, named, b, h, i, j, Sq, Skv):
    p = m.VARIANT.params
    width = p["width"] * p["frame"] // p["frames"]

    def allowed(qi, kj):
        if qi < p["prompt"] or kj < p["prompt"]:
            return True
        return abs((qi - p["prompt"]) % p["frame"] - (kj - p["prompt"]) % p["frame"]) < width
    return _mask_from(allowed, Sq, Skv)


def _batchify(m, named, b, h, i, j, Sq, Skv):
    size = m.VARIANT.params["size"]
    return _mask_from(lambda qi, kj: qi // size == kj // size and qi - qi // size * size >= kj - kj // size * size,
                      Sq, Skv)


def _sigmoid_attention(m, named, b, h, i, j, Sq, Skv):  # attention-gym's activation attention with f = sigmoid
    # unnormalized: the dense check sums sigmoid(s - log kv_len) * v (see _dense's normalize)
    return (lambda s: torch.log(torch.sigmoid(s - math.log(Skv)))), i >= j


def _activation(m, named, b, h, i, j, Sq, Skv):
    # unnormalized: the dense check sums exp(log(relu(s))) * v = relu(s) * v (log(0) = -inf: weight 0); the
    # direct relu(S) @ V check is test_activation_attention_relu_and_gelu below
    return (lambda s: torch.log(torch.relu(s))), i >= j


def _global_sliding_window(m, named, b, h, i, j, Sq, Skv):
    g, w = named["is_global"], m.VARIANT.params["window"]
    assert 1 < int(g.sum()) < Sq // 4 and not bool(g[:Sq // 4].all())
    return _plain(g[i] | g[j] | ((i - j).abs() <= w))


def _document_inner(m, named, b, h, i, j, Sq, Skv):
    offsets, prefix = named["offsets"].tolist(), m.VARIANT.params["prefix"]
    assert len(offsets) >= 4 and min(t - s for s, t in zip(offsets, offsets[1:])) > 0

    def where(pos):  # (document, position inside it) from the offsets alone
        d = max(n for n, start in enumerate(offsets[:-1]) if start <= pos)
        return d, pos - offsets[d]

    def allowed(qi, kj):
        (dq, lq), (dk, lk) = where(qi), where(kj)
        return dq == dk and (lk < prefix or lq >= lk)  # attention-gym's prefix LM on logical positions
    return _mask_from(allowed, Sq, Skv)


def _sasa_2d(m, named, b, h, i, j, Sq, Skv):
    W, w = m.VARIANT.params["width"], m.VARIANT.params["window"]
    assert Sq % W == 0 and Sq // W != W  # a non-square canvas

    def allowed(qi, kj):
        (qr, qc), (kr, kc) = divmod(qi, W), divmod(kj, W)
        return abs(qr - kr) <= w and abs(qc - kc) <= w
    fn, mask = _mask_from(allowed, Sq, Skv)
    assert int(mask.sum(-1).min()) == (w + 1) ** 2 and int(mask.sum(-1).max()) == (2 * w + 1) ** 2  # corners
    return fn, mask


def _checkerboard(m, named, b, h, i, j, Sq, Skv):
    odd = (j - i).abs() % 2 == 1
    return (lambda s: torch.where(odd, s * 0.5, s * 2.0)), torch.ones(1, 1, Sq, Skv, dtype=torch.bool)


def _relative_position(m, named, b, h, i, j, Sq, Skv):
    return (lambda s: s + (i - j)), torch.ones(1, 1, Sq, Skv, dtype=torch.bool)


DEFINITIONS = {
    "activation": _activation, "global_sliding_window": _global_sliding_window,
    "document_inner": _document_inner, "sasa_2d": _sasa_2d, "checkerboard": _checkerboard,
    "relative_position": _relative_position,
    "causal": _causal, "sliding_window": _sliding_window, "alibi": _alibi, "softcap": _softcap,
    "document": _document, "prefix_lm": _prefix_lm, "decode_causal": _decode_causal, "chunked": _chunked,
    "dilated_sliding_window": _dilated_sliding_window, "attention_sinks": _attention_sinks,
    "global_tokens": _global_tokens, "prefix_lm_document": _prefix_lm_document,
    "t5_relative_bias": _t5_relative_bias, "natten_2d": _natten_2d,
    "natten_tiled": _natten_tiled, "natten_morton": _natten_morton, "sta_2d": _sta_2d, "sta_3d": _sta_3d,
    "vsa_topk": _vsa_topk, "block_diffusion": _block_diffusion, "jetspec_tree": _jetspec_tree,
    "jetspec_training": _jetspec_training, "shared_prefix": _shared_prefix,
    "vision_cross_attention": _vision_cross_attention, "graphormer_spatial": _graphormer_spatial,
    "graphormer_edge": _graphormer_edge, "mla_rope_bias": _mla_rope_bias, "sandwich": _sandwich,
    "svg_spatial": _svg_spatial, "svg_temporal": _svg_temporal, "batchify": _batchify,
    "sigmoid_attention": _sigmoid_attention,
}


def _dense(q, k, v, fn, allowed, normalize=True):
    """softmax(fn(scale q.k) where allowed else -inf) v in float64; rows with no allowed key give 0. With
    ``normalize=False``, the numerator alone: sum of exp(fn(s)) v over the allowed keys."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = fn(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    allowed = allowed.expand_as(s)
    s = s.masked_fill(~allowed, -math.inf)
    if not normalize:
        return torch.exp(s) @ v
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _lengths(module, default: int) -> tuple[int, int]:
    if hasattr(module, "demo_lengths"):
        return module.demo_lengths(default)
    return default, default


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_runs_as_script(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.startswith(path.stem), printed
    err = float(printed.rsplit("=", 1)[1])
    assert err < 1e-5, printed


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_contract(path):
    m = _load(path)
    assert m.NAME == path.stem and m.NAME == m.NAME.lower()
    assert isinstance(m.VARIANT, al.Variant)
    assert m.__doc__ and "From" in m.__doc__, "the docstring must say where the variant comes from (From: ...)"
    assert list(inspect.signature(m.tensors).parameters) == ["batch", "q_heads", "q_len", "kv_len", "device"]
    q_len, kv_len = _lengths(m, 64)
    named = m.tensors(2, 4, q_len, kv_len)
    assert set(named) == set(m.VARIANT.tensor_names)
    assert m.NAME in DEFINITIONS, f"examples/{path.name} has no independent definition in this test"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_matches_dense_float64(path):
    m = _load(path)
    torch.manual_seed(0)
    q_len, kv_len = _lengths(m, 151)  # prime: no block size divides it; > 128 reaches T5's last bucket
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, Hq, q_len, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, kv_len, D, dtype=torch.float64) for _ in range(2))
    named = m.tensors(B, Hq, q_len, kv_len)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    i = torch.arange(q_len).view(1, 1, q_len, 1)
    j = torch.arange(kv_len).view(1, 1, 1, kv_len)
    fn, allowed = DEFINITIONS[m.NAME](m, named, b, h, i, j, q_len, kv_len)
    expected = _dense(q, k, v, fn, allowed, normalize=getattr(m.VARIANT, "normalize", True))
    got = m.VARIANT(q, k, v, backend="eager", **named)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def _gqa_scores(q, k, v):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), v


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_activation_attention_relu_and_gelu(backend):
    # activation attention as attention-gym's main() checks it: f(S) @ V directly, f = relu / exact (erf) gelu
    m = _load(EXAMPLES / "activation.py")
    torch.manual_seed(3)
    q = torch.randn(2, 4, 37, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 37, 16, dtype=torch.float64) for _ in range(2))
    s, vv = _gqa_scores(q, k, v)
    causal = torch.ones(37, 37, dtype=torch.bool).tril()
    relu = torch.nn.functional.relu(s).masked_fill(~causal, 0.0) @ vv
    gelu = torch.nn.functional.gelu(s).masked_fill(~causal, 0.0) @ vv
    assert bool((torch.nn.functional.gelu(s) < 0).any())  # the negative weights exp space cannot carry
    torch.testing.assert_close(m.VARIANT(q, k, v, backend=backend), relu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.gelu_attention(q, k, v, backend=backend), gelu, rtol=1e-9, atol=1e-9)
    # a row whose scores are all <= 0 has relu weights 0 everywhere: out 0, not NaN
    out = m.VARIANT(-q.abs(), k.abs(), v, backend=backend)
    assert bool((out == 0).all())


def test_gelu_weights_in_exp_space_are_refused():
    # log(gelu(score)) is NaN where gelu < 0: an AttnLangError that says why and points to the offset trick
    m = _load(EXAMPLES / "activation.py")
    bad = al.compile(score=f"log({m.GELU})", mask="q_idx >= kv_idx", normalize=False)
    q = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    with pytest.raises(al.AttnLangError, match="negative weight") as info:
        bad(q, q, q, backend="eager")
    assert "log(" in str(info.value) and "offset" in info.value.message
    assert "GELU" in m.VARIANT.explain() and "cannot be expressed" in m.VARIANT.explain()


def test_fa4_declines_training_where_the_derivative_is_infinite_at_zero_weights(monkeypatch):
    # FA4's score_mod_bwd runs at every position of a tile: relu's d/ds log(max(s, 0)) = 1 / max(s, 0) is
    # infinite where the weight is 0, and 0 * inf = NaN. The fa4 backend declines such training calls (auto then
    # runs flex), keeps the forward, and keeps the scores whose derivative stays finite.
    from attnlang.backends import KernelFailure, fa4
    monkeypatch.setattr(fa4, "_device_problem", lambda q: None)  # no GPU here: pretend the rest is fine
    monkeypatch.setattr(fa4, "_flash", lambda: None)
    risky = {"activation": "max(score, 0.0)"}
    for name in ("activation", "sigmoid_attention", "softcap", "alibi", "sandwich", "graphormer_edge", "causal"):
        m = _load(EXAMPLES / f"{name}.py")
        q_len, kv_len = _lengths(m, 40)
        q = torch.randn(2, 4, q_len, 64, dtype=torch.bfloat16)
        k = torch.randn(2, 4, kv_len, 64, dtype=torch.bfloat16)
        plan = m.VARIANT._plan(q, k, k, None, "fa4", True, None, m.tensors(2, 4, q_len, kv_len))
        why = fa4.backward_nan_risk(plan)
        if name not in risky:
            assert why is None, (name, why)
            continue
        assert risky[name] in why, why
        assert fa4.unsupported(q, plan) is None  # the forward runs on fa4
        assert "0 * inf" in fa4.unsupported(q.clone().requires_grad_(), plan)
        with pytest.raises(KernelFailure, match="0 \\* inf"):  # k / v alone needing gradients: refused in the call
            fa4.attention(q, k.clone().requires_grad_(), k, plan)
    for score, bad in (("log(score * score)", True), ("score / float(q_idx - kv_idx + 1000)", False),
                       ("score ** 0.5", True), ("score ** 3", False), ("log(sigmoid(score))", False)):
        v = al.compile(score=score)
        plan = v._plan(q, q, q, None, "fa4", True, None, {})
        assert (fa4.backward_nan_risk(plan) is not None) == bad, (score, fa4.backward_nan_risk(plan))


def test_decode_causal_with_a_cache():
    m = _load(EXAMPLES / "decode_causal.py")
    q_len, kv_len = m.demo_lengths(97)
    assert q_len < kv_len
    torch.manual_seed(1)
    q = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 33, 8, dtype=torch.float64) for _ in range(2))
    # one new token against a cache: it sees every key
    torch.testing.assert_close(m.VARIANT(q, k, v, backend="eager"), _dense(q, k, v, lambda s: s, torch.tensor(True)))


# ----- the softmax's denominator (issue 14): sinks -----
# A definition's fn may carry the sink logits of its rows ([B, H, Sq, 1]); _dense then adds the sink as one more
# softmax column that carries no value (LANGUAGE.md).

class _WithSink:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __call__(self, s):
        return self.fn(s)


def _gpt_oss(m, named, b, h, i, j, Sq, Skv):
    sinks = named["sinks"].to(torch.float64)
    return _WithSink(lambda s: s, sinks[h].expand(b.shape[0], -1, Sq, 1)), (i >= j) & (i - j < 128)


def _softmax_plus_one(m, named, b, h, i, j, Sq, Skv):
    return _WithSink(lambda s: s, torch.zeros(b.shape[0], h.shape[1], Sq, 1, dtype=torch.float64)), i >= j


DEFINITIONS.update({"gpt_oss": _gpt_oss, "softmax_plus_one": _softmax_plus_one})
_softmax_dense = _dense


def _dense(q, k, v, fn, allowed, **kwargs):  # noqa: F811 - the softmax check, and a sink column where fn has one
    if not isinstance(fn, _WithSink):
        return _softmax_dense(q, k, v, fn, allowed, **kwargs)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = fn(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -math.inf)
    return torch.softmax(torch.cat([s, fn.sink], -1), -1)[..., :-1] @ v


# ----- the GPU sample (issue 20): the fa4 backend against the same independent dense definitions -----
# bf16 inputs on CUDA; the dense float64 computation runs on the CPU from the same (bf16-rounded) values. A
# variant the fa4 backend declines must be refused by backend="fa4" with an AttnLangError, and "auto" must then
# run it on another backend, with the same answer.

GPU_OUT_TOL = 1e-2  # ||out - dense|| / ||dense||: a bf16 attention kernel (test_fa4_gpu.py's OUT_TOL)


def _fa4_ready():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (9, 0):
        return "FA4 needs sm90+"
    from attnlang.backends import fa4
    try:
        fa4._flash()
    except Exception as e:  # noqa: BLE001 - any import failure means: no FA4 here
        return f"flash_attn.cute not importable: {e}"
    return None


def _rel_err(a, b):
    return float((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_matches_dense_on_gpu_with_fa4(path):
    why = _fa4_ready()
    if why:
        pytest.skip(why)
    from attnlang.backends import fa4
    m = _load(path)
    torch.manual_seed(0)
    q_len, kv_len = _lengths(m, 257)
    B, Hq, Hkv, D = 2, 4, 2, 64
    q = torch.randn(B, Hq, q_len, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, kv_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    named = m.tensors(B, Hq, q_len, kv_len)  # on the CPU, as the dense definition reads them
    on_gpu = {n: t.cuda() for n, t in named.items()}
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    i = torch.arange(q_len).view(1, 1, q_len, 1)
    j = torch.arange(kv_len).view(1, 1, 1, kv_len)
    fn, allowed = DEFINITIONS[m.NAME](m, named, b, h, i, j, q_len, kv_len)
    expected = _dense(*(t.double().cpu() for t in (q, k, v)), fn, allowed,
                      normalize=getattr(m.VARIANT, "normalize", True))
    with torch.no_grad():
        plan = m.VARIANT._plan(q, k, v, None, "fa4", False, None, on_gpu)
        declined = fa4.unsupported(q, plan)
        if declined is None:
            got = m.VARIANT(q, k, v, backend="fa4", **on_gpu)
        else:
            with pytest.raises(al.AttnLangError):
                m.VARIANT(q, k, v, backend="fa4", **on_gpu)
            got = m.VARIANT(q, k, v, backend="auto", **on_gpu)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert not torch.isnan(got).any()
    err = _rel_err(got, expected)
    assert err < GPU_OUT_TOL, f"{m.NAME} ({'fa4' if declined is None else 'auto: ' + declined}): rel err {err:.2e}"
