"""attnlang.distributed on GPUs: the position variants on fa4 / flex, and the ring on NCCL (2 GPUs).

The position variant is what each ring step runs: it must give the rows of the single-process call at global
positions on every backend. The NCCL test spawns one process per GPU (skipped with fewer than 2) and compares out,
lse and gradients with a single-GPU call of the same backend (bf16 tolerances).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch

import attnlang as al
import attnlang.distributed as ald

pytestmark = pytest.mark.gpu

CASES = {
    "causal": ("score", "q_idx >= kv_idx", {}),
    "sliding_window": ("score", "0 <= q_idx - kv_idx < 256", {}),
    "documents": ("score", "doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx", {"doc": True}),
    "alibi": ("score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", {"slope": True}),
}
S = 2048


def _tensors(name, device):
    _, _, wanted = CASES[name]
    out = {}
    if "doc" in wanted:
        out["doc"] = torch.repeat_interleave(torch.arange(4), torch.tensor([1100, 300, 520, 128])).to(device)
    if "slope" in wanted:
        out["slope"] = (2.0 ** (-8.0 * torch.arange(1, 9) / 8)).to(device)
    return out


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


@pytest.mark.parametrize("backend", ["fa4", "flex"])
@pytest.mark.parametrize("name", list(CASES))
def test_position_variant_rows(name, backend):
    """Query rows of a zigzag shard against two key shards, merged by lse, equal the single call's rows."""
    if backend == "fa4":
        from attnlang.backends import fa4
        try:
            fa4._flash()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"flash_attn.cute not importable: {e}")
    score, mask, _ = CASES[name]
    v = al.compile(score=score, mask=mask)
    device = torch.device("cuda")
    tensors = _tensors(name, device)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, S, 128, generator=g).to(device, torch.bfloat16)
    k = torch.randn(1, 2, S, 128, generator=g).to(device, torch.bfloat16)
    vv = torch.randn(1, 2, S, 128, generator=g).to(device, torch.bfloat16)
    ref_out, ref_lse = v(q, k, vv, backend=backend, return_lse=True, **tensors)
    positions = ald.shard_positions(v, S, 2, **tensors)
    pv = ald.position_variant(v, S)
    wanted = set(pv.tensor_names)
    for r in range(2):
        rows = positions[r].to(device)
        out = lse = None
        for s in range(2):
            cols = positions[s].to(device)
            call = {n: t for n, t in tensors.items() if n in wanted}
            if ald.Q_POSITIONS in wanted:
                call[ald.Q_POSITIONS] = rows
            if ald.KV_POSITIONS in wanted:
                call[ald.KV_POSITIONS] = cols
            o, l = pv(q[:, :, rows], k[:, :, cols], vv[:, :, cols], backend=backend, return_lse=True, **call)
            if out is None:
                out, lse = o.float(), l.float()
            else:
                out, lse = ald._merge(out, lse, o, l.float())
        assert _rel(out, ref_out[:, :, rows]) < 2e-2
        finite = ref_lse[:, :, rows] > -float("inf")
        assert float((lse - ref_lse[:, :, rows]).abs()[finite].max()) < 2e-2


def _nccl_worker(rank, world, path, out_dir, backend):
    try:
        import torch.distributed as dist
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"file://{path}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        g = torch.Generator().manual_seed(1)
        q = torch.randn(1, 8, S, 128, generator=g).to(device, torch.bfloat16)
        k = torch.randn(1, 2, S, 128, generator=g).to(device, torch.bfloat16)
        vv = torch.randn(1, 2, S, 128, generator=g).to(device, torch.bfloat16)
        gout = torch.randn(1, 8, S, 128, generator=g).to(device, torch.bfloat16)
        for name in ("causal", "sliding_window", "documents"):
            score, mask, _ = CASES[name]
            v = al.compile(score=score, mask=mask)
            tensors = _tensors(name, device)
            leaves = [x.clone().requires_grad_() for x in (q, k, vv)]
            ro, rl = v(*leaves, backend=backend, return_lse=True, **tensors)
            ((ro.float() * gout.float()).sum() + rl.sum()).backward()
            positions = ald.shard_positions(v, S, world, **tensors)
            mine = positions[rank].to(device)
            local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, vv)]
            out, lse = ald.attention(v, *local, positions=positions, backend=backend, **tensors)
            ((out.float() * gout[:, :, mine].float()).sum() + lse.sum()).backward()
            assert _rel(out, ro[:, :, mine]) < 2e-2, name
            finite = rl[:, :, mine] > -float("inf")
            assert float((lse - rl[:, :, mine]).abs()[finite].max()) < 2e-2, name
            for x, ref in zip(local, leaves):
                assert _rel(x.grad, ref.grad[:, :, mine]) < 3e-2, name
        dist.barrier()
        dist.destroy_process_group()
        result = "ok"
    except BaseException:
        result = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(result)


@pytest.mark.parametrize("backend", ["fa4", "flex"])
def test_ring_on_nccl(tmp_path, backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import torch.multiprocessing as mp
    world = 2
    context = mp.spawn(_nccl_worker, args=(world, os.path.join(tmp_path, "init"), str(tmp_path), backend),
                       nprocs=world, join=False)
    deadline = time.monotonic() + 900
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.terminate()
            pytest.fail("the ranks did not finish within 900 s")
    got = {r: open(os.path.join(tmp_path, f"rank{r}.txt")).read()
           if os.path.exists(os.path.join(tmp_path, f"rank{r}.txt")) else "no result" for r in range(world)}
    failures = {r: m for r, m in got.items() if m != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{m}" for r, m in failures.items())
