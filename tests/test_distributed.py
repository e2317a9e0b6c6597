"""attnlang.distributed: sharding, the communication plan, and the ring on gloo against the single-process result.

The ring tests spawn 4 CPU processes once (spawning costs seconds): every variant runs on the 4-rank world and on
two 2-rank groups at once, the odd cases (_odd_cases) on a 3-rank and a 1-rank group at once, and each rank compares
its rows of out, lse and the gradients (q, k, v, the named tensors) with the single-process eager call. Bad input,
and errors that only one rank's blocks meet, are checked in the same processes: an AttnLangError on every rank.
"""

from __future__ import annotations

import datetime
import math
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlang as al
import attnlang.distributed as ald
from attnlang import AttnLangError

S = 512
DOC_LENGTHS = (260, 20, 100, 60, 8, 64)   # documents of very unequal lengths, none aligned to a chunk


def _doc(lengths=DOC_LENGTHS) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _cases(seq_len: int = S):
    """name -> (variant, tensors for the call); ALiBi's slope and the per-key bias are floating: they get
    gradients."""
    g = torch.Generator().manual_seed(3)
    doc = _doc() if seq_len == S else _doc(_scaled(seq_len))
    return {
        "causal": (al.compile(mask="q_idx >= kv_idx"), {}),
        "sliding_window": (al.compile(mask="0 <= q_idx - kv_idx < window", params={"window": 32}), {}),
        "documents": (al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"), {"doc": doc}),
        "prefix_lm": (al.compile(mask="kv_idx < prefix | q_idx >= kv_idx", params={"prefix": 96}), {}),
        "alibi": (al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx"),
                  {"slope": torch.rand(4, generator=g, dtype=torch.float64)}),
        "full_kv_bias": (al.compile(score="score + bias[kv_idx]"),
                         {"bias": torch.randn(seq_len, generator=g, dtype=torch.float64)}),
        # LANGUAGE.md's denominator: learned per-head sinks (gpt-oss) on a window; sigmoid attention (no
        # normalization) with a sink that reads the global q_idx
        "sinks_window": (al.compile(mask="q_idx >= kv_idx & q_idx - kv_idx < 128", sink="sinks[h]"),
                         {"sinks": torch.randn(4, generator=g, dtype=torch.float64)}),
        "sigmoid_sink": (al.compile(score="log(sigmoid(score - 1.0))", mask="q_idx >= kv_idx",
                                    sink="0.01 * q_idx - 2", normalize=False), {}),
    }


def _scaled(seq_len):
    lengths = [max(1, x * seq_len // S) for x in DOC_LENGTHS]
    lengths[0] += seq_len - sum(lengths)
    return tuple(lengths)


def _mask_tensors(v, tensors):
    return {n: t for n, t in tensors.items() if n in ("doc",)}


def _allowed_per_rank(v, positions, tensors) -> torch.Tensor:
    """Exact allowed (q, kv) pairs whose query lies on each rank (1x1 blocks: every block is full or empty)."""
    seq_len = sum(len(p) for p in positions)
    bs = v.block_sparsity(q_len=seq_len, kv_len=seq_len, block_size=1, **_mask_tensors(v, tensors))
    rows = (bs.kind[0, 0] == 2).sum(1).to(torch.float64)
    return torch.stack([rows[p].sum() for p in positions])


# ------------------------------------------------------------------------------------------------ sharding

@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("name", list(_cases()))
def test_shard_positions_balance(name, world):
    v, tensors = _cases(1024)[name]
    positions = ald.shard_positions(v, 1024, world, **tensors)
    assert len(positions) == world and all(p.dtype == torch.int64 and p.device.type == "cpu" for p in positions)
    assert torch.equal(torch.sort(torch.cat(positions)).values, torch.arange(1024))
    loads = _allowed_per_rank(v, positions, tensors)
    limit = 1.15 if name == "documents" else 1.10
    assert float(loads.max() / loads.mean()) <= limit, loads.tolist()
    # whole chunks, ascending, deterministic
    c = ald.chunk_size(1024, world)
    for p in positions:
        assert torch.all(p[1:] > p[:-1])
        starts = p[(torch.arange(len(p)) % c) == 0]
        assert torch.all(starts % c == 0)
    again = ald.shard_positions(v, 1024, world, **tensors)
    assert all(torch.equal(a, b) for a, b in zip(positions, again))


_MASKS = {"causal": "q_idx >= kv_idx", "window": "0 <= q_idx - kv_idx < 37", "docs": "doc[q_idx] == doc[kv_idx]",
          "docs_causal": "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", "prefix": "kv_idx < 50 | q_idx >= kv_idx",
          "full": "True", "diagonal": "q_idx == kv_idx", "anti_causal": "q_idx <= kv_idx"}


@settings(max_examples=30, deadline=None)
@given(seq_len=st.integers(1, 900), world=st.integers(1, 9), name=st.sampled_from(sorted(_MASKS)),
       cuts=st.lists(st.floats(0, 1), max_size=10))
def test_shard_positions_properties(seq_len, world, name, cuts):
    """Any length, any world size (W > S too), documents of any lengths: a permutation of range(S) in W ascending
    int64 CPU shards of whole chunks, the same list again, and within 1.3x the mean allowed pairs per rank once
    every rank can hold four positions (exact counts, 1x1 blocks)."""
    tensors = {}
    if "doc" in _MASKS[name]:
        ends = sorted({int(c * seq_len) for c in cuts} - {0, seq_len})
        lengths = [b - a for a, b in zip([0] + ends, ends + [seq_len])]
        tensors["doc"] = _doc(tuple(lengths))
    v = al.compile(mask=_MASKS[name])
    positions = ald.shard_positions(v, seq_len, world, **tensors)
    assert len(positions) == world
    assert all(p.dtype == torch.int64 and p.device.type == "cpu" and p.dim() == 1 for p in positions)
    assert torch.equal(torch.sort(torch.cat(positions)).values, torch.arange(seq_len))
    c = ald.chunk_size(seq_len, world)
    for p in positions:
        assert bool((p[1:] > p[:-1]).all())
        runs = torch.nonzero(p[1:] != p[:-1] + 1).flatten() + 1
        starts = torch.cat([p[:1], p[runs]]) if len(p) else p
        assert bool((starts % c == 0).all())
    assert all(torch.equal(a, b) for a, b in zip(positions, ald.shard_positions(v, seq_len, world, **tensors)))
    if seq_len >= 4 * world:
        loads = _allowed_per_rank(v, positions, tensors)
        assert float(loads.max() / loads.mean()) <= 1.3, loads.tolist()


def test_layouts_chosen():
    causal = al.compile(mask="q_idx >= kv_idx")
    p = ald.shard_positions(causal, 1024, 4)
    c = 1024 // 8  # zigzag: rank 0 holds the first and the last eighth
    assert torch.equal(p[0], torch.cat([torch.arange(0, c), torch.arange(1024 - c, 1024)]))
    full = ald.shard_positions(al.compile(), 1024, 4)
    assert torch.equal(full[1], torch.arange(256, 512))  # contiguous: already balanced
    window = ald.shard_positions(al.compile(mask="0 <= q_idx - kv_idx < 64"), 1024, 4)
    assert torch.equal(window[2], torch.arange(512, 768))


def test_documents_balanced_where_zigzag_is_not():
    v, tensors = _cases(1024)["documents"]
    loads = _allowed_per_rank(v, ald.shard_positions(v, 1024, 8, **tensors), tensors)
    zig = ald._zigzag(torch.zeros(64), 8)
    zig_pos = [ald._chunk_positions(c, 16, 1024) for c in zig]
    zig_loads = _allowed_per_rank(v, zig_pos, tensors)
    assert float(loads.max() / loads.mean()) < float(zig_loads.max() / zig_loads.mean())


def test_short_documents_stay_with_their_neighbours():
    """Many short documents: contiguous shards cut by work, balanced, and most shards never travel."""
    v = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    doc = _doc((40,) * 25 + (24,))
    positions = ald.shard_positions(v, 1024, 4, doc=doc)
    assert all(torch.equal(p, torch.arange(int(p[0]), int(p[0]) + len(p))) for p in positions)
    loads = _allowed_per_rank(v, positions, {"doc": doc})
    assert float(loads.max() / loads.mean()) <= 1.15
    plan = ald.plan_communication(v, positions, doc=doc)
    assert max(plan.last_step) <= 1 and plan.transfers_skipped() >= 4 * 3 - 4


def test_chunk_size():
    assert ald.chunk_size(1 << 20, 64) == 128
    assert ald.chunk_size(1024, 4) == 16
    assert ald.chunk_size(5, 4) == 1


def test_long_sequences_coarser_chunks(monkeypatch):
    """Past the block-sparsity limit at 128-position chunks (S > 2M in real sizes; here the limits are scaled
    down), chunks and the plan's blocks grow by powers of two instead of shard_positions failing with advice to
    pass a block_size it does not take."""
    import attnlang.sparsity as sparsity
    monkeypatch.setattr(sparsity, "MAX_BLOCKS", 1 << 16)
    monkeypatch.setattr(ald, "PLAN_BLOCKS", 1 << 14)
    S_, W = 1 << 16, 4                      # 512 x 512 blocks of 128: past MAX_BLOCKS
    assert ald.chunk_size(S_, W) == 512 and ald.chunk_size(1024, 4) == 16
    window = al.compile(mask="0 <= q_idx - kv_idx < 1000")
    positions = ald.shard_positions(window, S_, W)
    assert torch.equal(torch.cat(positions), torch.arange(S_))       # contiguous, balanced already
    plan = ald.plan_communication(window, positions)
    assert plan.granularity == 512 and plan.last_step == (1, 1, 1, 0)  # still skips what no rank needs
    assert len(ald.rank_work(window, positions)) == W


def test_shard_positions_errors():
    v = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    with pytest.raises(AttnLangError, match="seq_len"):
        ald.shard_positions(v, 0, 2, doc=torch.zeros(4, dtype=torch.long))
    with pytest.raises(AttnLangError, match="doc"):
        ald.shard_positions(v, 64, 2, doc=torch.zeros(63, dtype=torch.long))   # wrong length
    with pytest.raises(AttnLangError, match="Variant"):
        ald.shard_positions("q_idx >= kv_idx", 64, 2)
    with pytest.raises(AttnLangError, match="'doc' must be a torch.Tensor, got list"):
        ald.shard_positions(v, 64, 2, doc=[0] * 64)


def test_rank_work_matches_exact_counts():
    v, tensors = _cases(1024)["documents"]
    positions = ald.shard_positions(v, 1024, 4, **tensors)
    exact = _allowed_per_rank(v, positions, tensors)
    assert torch.allclose(torch.tensor(ald.rank_work(v, positions, **tensors), dtype=torch.float64), exact)


# ------------------------------------------------------------------------------------------------ the plan

def test_plan_sliding_window_skips_transfers():
    v = al.compile(mask="0 <= q_idx - kv_idx < 64")
    positions = ald.shard_positions(v, 1024, 4)
    plan = ald.plan_communication(v, positions)
    # each rank needs its own shard and the previous one; the last shard never needs to go round
    assert plan.last_step == (1, 1, 1, 0)
    assert plan.transfers_skipped() == 4 * 3 - 3
    assert plan.computed_steps() == [1, 2, 2, 2]
    assert plan.skipped_steps() == [3, 2, 2, 2]
    assert plan.bytes_sent(10.0) == [2560.0, 2560.0, 2560.0, 0.0]
    assert plan.granularity == 128


def test_plan_causal_and_full():
    causal = al.compile(mask="q_idx >= kv_idx")
    plan = ald.plan_communication(causal, ald.shard_positions(causal, 1024, 4))
    assert bool(plan.needed.all()) and plan.transfers_skipped() == 0   # zigzag: every rank sees every shard
    contiguous = [torch.arange(r * 256, (r + 1) * 256) for r in range(4)]
    plan = ald.plan_communication(causal, contiguous)
    assert torch.equal(plan.needed, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert plan.last_step == (3, 2, 1, 0)


def test_plan_is_sound_for_documents():
    v, tensors = _cases(1024)["documents"]
    positions = ald.shard_positions(v, 1024, 4, **tensors)
    plan = ald.plan_communication(v, positions, **tensors)
    bs = v.block_sparsity(q_len=1024, kv_len=1024, block_size=1, **tensors)
    allowed = bs.kind[0, 0] == 2
    for r in range(4):
        for s in range(4):
            if not plan.needed[r, s]:
                assert not bool(allowed[positions[r]][:, positions[s]].any())


def test_the_cached_plan_is_keyed_by_the_mask_tensors_values():
    # the ring's plan cache keyed mask tensors by two sums, equal for these two (one key allowed, at positions 1009
    # apart): the second call got the first's plan, whose rank 0 skips the shard holding its key, and rank 0's
    # out was silently wrong on gloo (found by the lifetime / staleness audit)
    v = al.compile(mask="allow[kv_idx] | q_idx == kv_idx")
    positions = [torch.arange(0, 1024), torch.arange(1024, 2048)]
    a, b = torch.zeros(2048, dtype=torch.bool), torch.zeros(2048, dtype=torch.bool)
    a[100], b[1109] = True, True
    assert not torch.equal(ald.plan_communication(v, positions, allow=a).needed,
                           ald.plan_communication(v, positions, allow=b).needed)
    assert ald._plan_key(v, positions, 1, 1, {"allow": a}) != ald._plan_key(v, positions, 1, 1, {"allow": b})
    assert ald._plan_key(v, positions, 1, 1, {"allow": a}) == ald._plan_key(v, positions, 1, 1, {"allow": a.clone()})


def test_ranks_whose_named_tensors_differ_disagree():
    # the ranks' agreement check compared the named tensors by the same two sums, equal for these two: a rank with
    # other values went undetected (found by the lifetime / staleness audit); -0.0 and 0.0, NaNs, still agree
    v = al.compile(score="score + bias[kv_idx]", mask="allow[kv_idx] | q_idx == kv_idx")
    positions = [torch.arange(0, 1024), torch.arange(1024, 2048)]
    q = torch.randn(1, 1, 1024, 8)
    a, b = torch.zeros(2048, dtype=torch.bool), torch.zeros(2048, dtype=torch.bool)
    a[100], b[1109] = True, True
    bias = torch.zeros(2048)
    bias[7] = math.nan

    def signature(allow, bias):
        return ald._local_checks(v, q, q, q, positions, 0, 2, "eager", None, {"allow": allow, "bias": bias},
                                 (True, None, None))[0]
    assert signature(a, bias) != signature(b, bias)
    assert signature(a, bias) == signature(a.clone(), torch.where(bias == 0, -0.0, bias))


def test_positions_errors():
    v = al.compile(mask="q_idx >= kv_idx")
    with pytest.raises(AttnLangError, match="permutation"):
        ald.plan_communication(v, [torch.arange(0, 10), torch.arange(9, 20)])
    with pytest.raises(AttnLangError, match="integer"):
        ald.plan_communication(v, [torch.arange(0, 10.0)])
    with pytest.raises(AttnLangError, match="list"):
        ald.plan_communication(v, torch.arange(10))


def test_position_variant():
    v = al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="kv_idx <= q_idx + kv_len - q_len")
    pv = ald.position_variant(v, 64)
    assert set(pv.tensor_names) == {"slope", "cp_q_positions", "cp_kv_positions"}
    q = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    slope = torch.rand(2, dtype=torch.float64)
    qp, kp = torch.arange(40, 64), torch.cat([torch.arange(0, 8), torch.arange(32, 64)])
    out, lse = pv(q[:, :, qp], k[:, :, kp], k[:, :, kp], cp_q_positions=qp, cp_kv_positions=kp, slope=slope,
                  return_lse=True)
    keep = torch.zeros(64, dtype=torch.bool)
    keep[kp] = True
    ref_mask = al.compile(score="score + slope[h] * (kv_idx - q_idx)",
                          mask="kv_idx <= q_idx & keep[kv_idx]")
    ro, rl = ref_mask(q, k, k, slope=slope, keep=keep, return_lse=True)
    torch.testing.assert_close(out, ro[:, :, qp])
    torch.testing.assert_close(lse, rl[:, :, qp])
    with pytest.raises(AttnLangError, match="cp_q_positions"):
        ald.position_variant(al.compile(mask="cp_q_positions[q_idx] > 0"), 64)


# ------------------------------------------------------------------------------------------------ the ring

def _inputs(seq_len=S, heads=4, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(11)
    shape_q, shape_kv = (1, heads, seq_len, dim), (1, kv_heads, seq_len, dim)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in (shape_q, shape_kv, shape_kv))
    gout = torch.randn(shape_q, generator=g, dtype=torch.float64)
    glse = torch.randn(shape_q[:3], generator=g, dtype=torch.float64)
    return q, k, v, gout, glse


def _reference(variant, tensors, q, k, v, gout, glse):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    named = {n: (t.clone().requires_grad_() if t.is_floating_point() else t) for n, t in tensors.items()}
    out, lse = variant(*leaves, backend="eager", return_lse=True, **named)
    ((out * gout).sum() + (lse * glse).sum()).backward()
    return out, lse, [x.grad for x in leaves], {n: t.grad for n, t in named.items() if t.is_floating_point()}


def _check_ring(variant, tensors, group, rank_in_group, world, ref, data, stats=None, recompute=None):
    q, k, v, gout, glse = data
    positions = ald.shard_positions(variant, S, world, **tensors)
    p = positions[rank_in_group]
    leaves = [x[:, :, p].clone().requires_grad_() for x in (q, k, v)]
    named = {n: (t.clone().requires_grad_() if t.is_floating_point() else t) for n, t in tensors.items()}
    out, lse = ald.attention(variant, *leaves, positions=positions, group=group, comm_stats=stats,
                             recompute=recompute, **named)
    ((out * gout[:, :, p]).sum() + (lse * glse[:, :, p]).sum()).backward()
    r_out, r_lse, r_grads, r_named = ref
    tol = dict(atol=2e-5, rtol=2e-5)   # lse is float32 on every backend
    torch.testing.assert_close(out, r_out[:, :, p].detach(), **tol)
    torch.testing.assert_close(lse, r_lse[:, :, p].detach(), **tol)
    for name, leaf, r in zip("qkv", leaves, r_grads):
        torch.testing.assert_close(leaf.grad, r[:, :, p], **tol, msg=lambda m, n=name: f"d{n}: {m}")
    for n, r in r_named.items():
        torch.testing.assert_close(named[n].grad, r, **tol, msg=lambda m, n=n: f"d{n}: {m}")


def _expect_error_everywhere(match, fn):
    try:
        fn()
    except AttnLangError as e:
        assert match in str(e), str(e)
        return
    raise AssertionError(f"no AttnLangError ({match!r})")


def _worker(rank, world, path, out_dir):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=90))
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair = pairs[rank // 2]
        triple, single = dist.new_group([0, 1, 2]), dist.new_group([3])
        data = _inputs()
        for name, (variant, tensors) in _cases().items():
            ref = _reference(variant, tensors, *data)
            stats = {}
            # 4 ranks: the backward recomputes and runs the ring again (forced for the window, which would keep
            # its graphs); 2 ranks: the forward keeps each step's graph (the default there)
            _check_ring(variant, tensors, None, rank, world, ref, data, stats,
                        recompute=True if name == "sliding_window" else None)
            if name == "sliding_window":
                # contiguous shards: each rank computes with its own and the previous shard only
                assert stats["computed"] == (2 if rank == 0 else 4), stats   # forward + backward
                assert stats["skipped"] == (3 if rank == 0 else 2), stats
                # forward k / v, backward k / v, the dk / dv accumulator, and its return home from the next rank
                assert stats["sends"] == (3, 4, 4, 1)[rank], stats
                assert stats["returns"] == (0, 1, 1, 1)[rank], stats
                stats = {}
                _check_ring(variant, tensors, None, rank, world, ref, data, stats, recompute=False)
                # kept graphs: no recompute, no backward ring; each dk / dv goes straight home
                assert stats["computed"] == (1, 2, 2, 2)[rank], stats
                assert stats["sends"] == (1, 2, 2, 1)[rank], stats
            _check_ring(variant, tensors, pair, rank % 2, 2, ref, data)
        # a 3-rank group and a 1-rank group at once: odd world sizes and lengths, empty ranks (_odd_cases)
        sub, sub_rank, sub_world = (triple, rank, 3) if rank < 3 else (single, 0, 1)
        failures = [f for case in _odd_cases() for f in _odd_case_check(case, sub, sub_rank, sub_world)]
        assert not failures, "\n".join(failures)
        # bad input: an AttnLangError on every rank, never a hang
        variant, tensors = _cases()["documents"]
        positions = ald.shard_positions(variant, S, world, **tensors)
        q, k, v = (x[:, :, positions[rank]] for x in data[:3])
        short = {"doc": tensors["doc"][:-1]} if rank == 1 else tensors            # a tensor of the wrong length
        _expect_error_everywhere("rank 1", lambda: ald.attention(variant, q, k, v, positions=positions, **short))
        wrong = q[:, :, :-1] if rank == 2 else q                                    # shards not matching positions
        _expect_error_everywhere("rank 2", lambda: ald.attention(variant, wrong, k, v, positions=positions,
                                                                 **tensors))
        wide = torch.cat([q, q], 1) if rank == 3 else q                             # unequal shapes across ranks
        _expect_error_everywhere("differs", lambda: ald.attention(variant, wide, k, v, positions=positions,
                                                                  **tensors))
        other = [positions[1], positions[0], *positions[2:]] if rank == 0 else positions  # ranks disagree
        _expect_error_everywhere("positions", lambda: ald.attention(variant, q, k, v, positions=other, **tensors))
        doc2 = tensors["doc"].flip(0) if rank == 0 else tensors["doc"]              # different mask tensors
        _expect_error_everywhere("values", lambda: ald.attention(variant, q, k, v, positions=positions, doc=doc2))
        _expect_error_everywhere("permutation", lambda: ald.attention(
            variant, q, k, v, positions=[p[:-1] if i == 0 else p for i, p in enumerate(positions)], **tensors))
        # errors that only show inside the ring or after it, on one rank: every rank raises, none waits
        nan_q = torch.full_like(q, float("nan")) if rank == 1 else q                # a NaN score on rank 1's rows
        _expect_error_everywhere("failed on rank 1", lambda: ald.attention(variant, nan_q, k, v, positions=positions,
                                                                           **tensors))
        _expect_error_everywhere("FA4 needs a CUDA GPU", lambda: ald.attention(variant, q, k, v, positions=positions,
                                                                               backend="fa4", **tensors))
        sink_v = al.compile(mask="q_idx >= kv_idx", sink="sk[q_idx]")
        sk = torch.zeros(S, dtype=torch.float64)
        sink_pos = ald.shard_positions(sink_v, S, world)
        sk[sink_pos[2][0]] = float("nan")                                            # the sink of one row of rank 2
        qs, ks, vs = (x[:, :, sink_pos[rank]] for x in data[:3])
        _expect_error_everywhere("failed on rank 2", lambda: ald.attention(sink_v, qs, ks, vs, positions=sink_pos,
                                                                           sk=sk))
        kv2 = [torch.cat([x, x]) for x in (k, v)]                                   # k / v of another batch size
        _expect_error_everywhere("batch sizes differ", lambda: ald.attention(variant, q, *kv2, positions=positions,
                                                                             **tensors))
        # ranks that disagree on a score tensor's values or on what autograd differentiates; foreign groups
        alibi, slope = _cases()["alibi"]
        slope = slope["slope"]
        apos = ald.shard_positions(alibi, S, world)
        qa, ka, va = (x[:, :, apos[rank]] for x in data[:3])
        _expect_error_everywhere("values", lambda: ald.attention(alibi, qa, ka, va, positions=apos,
                                                                 slope=slope * (2 if rank == 2 else 1)))
        _expect_error_everywhere("require grad", lambda: ald.attention(
            alibi, qa, ka, va, positions=apos, slope=slope.clone().requires_grad_(rank == 0)))
        _expect_error_everywhere("require grad", lambda: ald.attention(
            alibi, qa.clone().requires_grad_(rank == 3), ka, va, positions=apos, slope=slope))
        if rank == 3:   # alone: the other ranks do not call
            _expect_error_everywhere("not a member", lambda: ald.attention(
                alibi, qa, ka, va, positions=ald.shard_positions(alibi, S, 3), group=triple, slope=slope))
        _expect_error_everywhere("process group", lambda: ald.attention(alibi, qa, ka, va, positions=apos,
                                                                        group="world", slope=slope))
        # arguments that one rank gets wrong, or that must agree (the backward's path depends on recompute)
        _expect_error_everywhere("return_lse", lambda: ald.attention(variant, q, k, v, positions=positions,
                                                                     return_lse=1 if rank == 0 else True, **tensors))
        _expect_error_everywhere("recompute", lambda: ald.attention(variant, q, k, v, positions=positions,
                                                                    recompute=rank == 1, **tensors))
        _expect_error_everywhere("comm_stats", lambda: ald.attention(variant, q, k, v, positions=positions,
                                                                     comm_stats=[] if rank == 2 else None, **tensors))
        _expect_error_everywhere("takes no kernel_options", lambda: ald.attention(
            variant, q, k, v, positions=positions, kernel_options={}, **tensors))
        _expect_error_everywhere("unknown backend 'nope'", lambda: ald.attention(
            variant, q, k, v, positions=positions, backend="nope" if rank == 3 else "auto", **tensors))
        # still in step after the errors
        out = ald.attention(variant, q, k, v, positions=positions, return_lse=False, **tensors)
        ref = variant(*data[:3], backend="eager", **tensors)
        torch.testing.assert_close(out, ref[:, :, positions[rank]], atol=2e-5, rtol=2e-5)
        dist.barrier()
        dist.destroy_process_group()
        result = "ok"
    except BaseException:
        result = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(result)


def test_ring_on_gloo(tmp_path):
    """One spawn of 4 gloo ranks: every variant on the world and on two 2-rank groups, the odd cases on a 3-rank
    and a 1-rank group, then bad input."""
    world = 4
    context = mp.spawn(_worker, args=(world, os.path.join(tmp_path, "init"), str(tmp_path)), nprocs=world,
                       join=False)
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.terminate()
            pytest.fail("the ranks did not finish within 600 s")
    got = {}
    for r in range(world):
        path = os.path.join(tmp_path, f"rank{r}.txt")
        got[r] = open(path).read() if os.path.exists(path) else "no result"
    failures = {r: msg for r, msg in got.items() if msg != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{msg}" for r, msg in failures.items())


def test_needs_a_process_group():
    v = al.compile(mask="q_idx >= kv_idx")
    q = torch.randn(1, 1, 8, 4)
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(AttnLangError, match="init_process_group"):
        ald.attention(v, q, q, q, positions=[torch.arange(8)])


# ------------------------------------------------------------------------------------------------ odd cases

def _odd_cases():
    """(name, variant, tensors, S, B, Hq, Hkv, D, Dv, dtype): an odd world size, lengths that no chunk or world size
    divides, ranks with no rows (W > S) or with no allowed key for any of their rows, float32 and float64, an
    empty batch and no heads."""
    g = torch.Generator().manual_seed(7)
    f64 = torch.float64
    causal = al.compile(mask="q_idx >= kv_idx")
    docs = al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx")
    return [
        ("causal_S2_empty_rank", causal, {}, 2, 1, 2, 1, 4, 4, f64),
        ("sink_S2_empty_rank", al.compile(mask="q_idx >= kv_idx", sink="sk[h] + 0.1 * q_idx"),
         {"sk": torch.randn(2, generator=g, dtype=f64)}, 2, 1, 2, 1, 4, 4, f64),
        ("no_key_for_a_rank", al.compile(mask="kv_idx <= q_idx + kv_len - q_len & q_idx > q_len - 5"), {},
         37, 1, 2, 1, 4, 4, f64),
        ("docs_uneven_gqa_b2", docs, {"doc": _doc((3, 17, 1, 9, 7))}, 37, 2, 4, 2, 4, 5, f64),
        ("rel_table_f32", al.compile(score="score + rel[q_idx - kv_idx + kv_len - 1]", mask="q_idx >= kv_idx"),
         {"rel": torch.randn(2 * 41 - 1, generator=g)}, 41, 1, 2, 2, 4, 4, torch.float32),
        ("sink_q_window", al.compile(mask="q_idx >= kv_idx & q_idx - kv_idx < 6", sink="sk[q_idx]"),
         {"sk": torch.randn(37, generator=g, dtype=f64)}, 37, 1, 2, 1, 4, 4, f64),
        ("sigmoid_len_score", al.compile(score="log(sigmoid(score + 0.1 * (q_len - q_idx)))", normalize=False), {},
         23, 1, 2, 1, 4, 4, f64),
        # empty results on every rank, with zero gradients (the named tensor's too), and no communication
        ("empty_batch_sink", al.compile(mask="q_idx >= kv_idx", sink="sk[h]"),
         {"sk": torch.randn(2, generator=g, dtype=f64)}, 37, 0, 2, 1, 4, 4, f64),
        ("no_heads", causal, {}, 37, 1, 0, 0, 4, 4, torch.float32),
    ]


def _odd_case_check(case, group, rank, world):
    """Forward and backward on every rank first (collective), then the comparisons; returns the failures."""
    name, variant, tensors, S_, B, Hq, Hkv, D, Dv, dtype = case
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(B, Hq, S_, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S_, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S_, Dv, generator=g, dtype=dtype)
    gout = torch.randn(B, Hq, S_, Dv, generator=g, dtype=dtype)
    glse = torch.randn(B, Hq, S_, generator=g, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    named = {n: (t.clone().requires_grad_() if t.is_floating_point() else t) for n, t in tensors.items()}
    r_out, r_lse = variant(*leaves, backend="eager", return_lse=True, **named)
    ((r_out * gout).sum() + (torch.nan_to_num(r_lse, neginf=0.0) * glse).sum()).backward()
    positions = ald.shard_positions(variant, S_, world, **tensors)
    p = positions[rank]
    failures = []
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    for recompute in (True, False):
        loc = [x[:, :, p].clone().requires_grad_() for x in (q, k, v)]
        nl = {n: (t.clone().requires_grad_() if t.is_floating_point() else t) for n, t in tensors.items()}
        out, lse = ald.attention(variant, *loc, positions=positions, group=group, recompute=recompute, **nl)
        ((out * gout[:, :, p]).sum() + (torch.nan_to_num(lse, neginf=0.0) * glse[:, :, p]).sum()).backward()
        try:
            assert lse.dtype == r_lse.dtype, f"lse is {lse.dtype}, the single-process call's {r_lse.dtype}"
            torch.testing.assert_close(out, r_out[:, :, p].detach(), **tol)
            torch.testing.assert_close(lse, r_lse[:, :, p].detach(), **tol)
            for x, leaf, ref in zip("qkv", loc, leaves):
                torch.testing.assert_close(leaf.grad, ref.grad[:, :, p], **tol, msg=lambda m, x=x: f"d{x}: {m}")
            for n, t in nl.items():
                if t.is_floating_point():   # summed over ranks: the single-process gradient on every rank
                    torch.testing.assert_close(t.grad, named[n].grad, **tol, msg=lambda m, n=n: f"d{n}: {m}")
        except AssertionError as e:
            failures.append(f"{name} recompute={recompute}: {e}")
    return failures


def test_shard_positions_without_a_tensor_the_mask_reads_names_it_not_block_sparsity():
    variant = al.compile(mask="doc[q_idx] == doc[kv_idx]")
    with pytest.raises(al.AttnLangError, match=r"doc=<tensor>") as info:
        ald.shard_positions(variant, seq_len=64, world_size=2)
    assert "block_sparsity" not in str(info.value)  # the caller called shard_positions
