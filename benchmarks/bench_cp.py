"""Context parallelism on several GPUs: correctness with NCCL, throughput, balance, hidden communication.

Run under torchrun, one process per GPU (NCCL; NVLink multicast left off: NCCL_NVLS_ENABLE=0):

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 benchmarks/bench_cp.py            # check + benchmark
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --check-only
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --smoke     # CPU, gloo, eager, tiny

1. Correctness: the CPU tests' variants (causal, sliding window, unequal documents, prefix LM, ALiBi, full + a
   per-key bias) with NCCL, bf16, against a single-GPU call of the same variant on the same backend: out, lse and
   gradients to q, k, v and the bias (max |difference| / max |single-GPU value|).
2. Throughput at S = 131072 (B=1, Hq=32, Hkv=8, D=128, bf16, fa4 backend), causal and unequal documents, forward and
   forward+backward: tokens per second per GPU (S / (time x W)), against one GPU running the whole sequence (rank 0,
   the others waiting) and against torch's context_parallel (causal: SDPA with load balancing, k / v expanded to
   the query heads; documents: FlexAttention context parallel with the per-document head-tail load balancer, where
   this torch has it).
3. Balance: max / mean over ranks of the time of a rank's own block computations alone (the partial attention calls
   the plan asks of it). Hidden communication: 1 - (t_ring - max_rank t_compute) / t_transfers, clipped to [0, 1],
   where t_transfers is the ring's transfers alone (the same schedule, no compute; with the backward: the forward's
   k / v ring plus, when the backward recomputes, its k / v ring, plus one float32 dk / dv ring).

Writes benchmarks/results/cp_h200.json and cp_h200.md (rank 0): {"device", "world_size", "rows": [{"variant",
"seq_len", "pass", "tokens_per_s_per_gpu", "single_gpu_tokens_per_s", "torch_cp_tokens_per_s", "balance",
"comm_hidden", ...}], "check": [...]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import attnlang as al
import attnlang.distributed as ald

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# setup and timing

def setup(smoke: bool):
    if smoke:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    return dist.get_rank(), dist.get_world_size(), device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int, group=None, barrier: bool = True) -> float:
    """Median seconds per call of fn(), measured between barriers (the slowest rank's time, all ranks agree)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(iters):
        if barrier:
            dist.barrier(group=group)
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    if barrier:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def gather_floats(x: float, device) -> list[float]:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(o) for o in out]


# ---------------------------------------------------------------------------------------------------------------
# the variants

def doc_lengths(seq_len: int) -> list[int]:
    """Documents of very unequal lengths (multiples of 1024 where S allows, as torch's per-document balancer needs
    lengths divisible by 2 x world size): a long one of S/2, then halving, the rest in short ones."""
    unit = 1024 if seq_len >= 32768 else max(1, seq_len // 32)
    lengths, left, size = [], seq_len, seq_len // 2
    while left > 0:
        size = max(unit, min(size, left) // unit * unit)
        size = min(size, left)
        lengths.append(size)
        left -= size
        size //= 2
    return lengths


def variants(seq_len: int, heads: int, device):
    doc = torch.repeat_interleave(torch.arange(len(doc_lengths(seq_len))), torch.tensor(doc_lengths(seq_len)))
    g = torch.Generator().manual_seed(5)
    slope = (2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)).to(torch.float32)
    bias = torch.randn(seq_len, generator=g)
    return {
        "causal": (al.compile(mask="q_idx >= kv_idx"), {}),
        "sliding_window": (al.compile(mask="0 <= q_idx - kv_idx < window", params={"window": 1024}), {}),
        "documents": (al.compile(mask="doc[q_idx] == doc[kv_idx] & q_idx >= kv_idx"), {"doc": doc.to(device)}),
        "prefix_lm": (al.compile(mask="kv_idx < prefix | q_idx >= kv_idx", params={"prefix": seq_len // 8}), {}),
        "alibi": (al.compile(score="score + slope[h] * (kv_idx - q_idx)", mask="q_idx >= kv_idx"),
                  {"slope": slope.to(device)}),
        "full_kv_bias": (al.compile(score="score + bias[kv_idx]"), {"bias": bias.to(device)}),
    }


def global_inputs(seq_len, heads, kv_heads, dim, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, heads, seq_len, dim, generator=g).to(device, dtype)
    k = torch.randn(1, kv_heads, seq_len, dim, generator=g).to(device, dtype)
    v = torch.randn(1, kv_heads, seq_len, dim, generator=g).to(device, dtype)
    gout = torch.randn(1, heads, seq_len, dim, generator=g).to(device, dtype)
    return q, k, v, gout


# ---------------------------------------------------------------------------------------------------------------
# 1. correctness

def check(args, rank, world, device):
    dtype = torch.float32 if args.smoke else torch.bfloat16
    S = args.check_len
    heads, kv_heads, dim = (4, 2, 16) if args.smoke else (8, 2, 128)
    q, k, v, gout = global_inputs(S, heads, kv_heads, dim, dtype, device)
    rows = []
    for name, (variant, tensors) in variants(S, heads, device).items():
        floating = {n for n, t in tensors.items() if t.is_floating_point()}
        backend = args.backend if not floating else "auto"   # fa4 computes no gradients to named tensors
        row = {"variant": name, "seq_len": S, "backend": backend, "world_size": world}
        try:
            named = {n: (t.clone().requires_grad_() if n in floating else t) for n, t in tensors.items()}
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out, lse = variant(*leaves, backend=backend, return_lse=True, **named)
            ((out.float() * gout.float()).sum() + lse.sum()).backward()
            single = {"out": out.detach(), "lse": lse.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad,
                      "dv": leaves[2].grad, **{f"d{n}": named[n].grad for n in floating}}
            positions = ald.shard_positions(variant, S, world, **tensors)
            mine = positions[rank].to(device)
            named_cp = {n: (t.clone().requires_grad_() if n in floating else t) for n, t in tensors.items()}
            local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
            stats = {}
            o, l = ald.attention(variant, *local, positions=positions, backend=backend, comm_stats=stats,
                                 **named_cp)
            ((o.float() * gout[:, :, mine].float()).sum() + l.sum()).backward()
            cp = {"out": o.detach(), "lse": l.detach(), "dq": local[0].grad, "dk": local[1].grad,
                  "dv": local[2].grad, **{f"d{n}": named_cp[n].grad for n in floating}}
            errors = {}
            for key, ref in single.items():
                ref = ref if key.startswith("d") and key[1:] in floating else ref[:, :, mine]
                got = cp[key]
                scale = float(ref.float().abs().max().clamp_min(1e-6))
                errors[key] = float((got.float() - ref.float()).abs().max()) / scale
            worst = {key: max(gather_floats(e, device)) for key, e in errors.items()}
            row.update({"rel_error": worst, "ok": all(e <= args.tolerance for e in worst.values()),
                        "stats_rank0": stats if rank == 0 else None})
        except Exception as e:  # noqa: BLE001 - recorded, and every rank reaches the next variant
            row.update({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        oks = gather_floats(1.0 if row.get("ok") else 0.0, device)
        row["ok_all_ranks"] = min(oks) == 1.0
        if rank == 0:
            print(f"check {name:15s} backend={backend:5s} ok={row['ok_all_ranks']} "
                  f"{row.get('rel_error', row.get('error'))}", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 2. / 3. throughput, balance, hidden communication

def ring_transfers(plan: ald.CommPlan, numel_per_pos: int, dtype, device, rank: int, world: int):
    """The forward ring's transfers alone, as attention schedules them (no compute)."""
    bufs = {s: torch.zeros(plan.lengths[s] * numel_per_pos, dtype=dtype, device=device) for s in range(world)}

    def run():
        for t in range(world - 1):
            s, nxt = (rank - t) % world, (rank - t - 1) % world
            ops = []
            if plan.last_step[nxt] >= t + 1:
                ops.append(dist.P2POp(dist.irecv, bufs[nxt], (rank - 1) % world))
            if plan.last_step[s] >= t + 1:
                ops.append(dist.P2POp(dist.isend, bufs[s], (rank + 1) % world))
            if ops:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
    return run


def own_compute(variant, positions, plan, q, k, v, tensors, backend, rank, S, grad: bool, gout):
    """This rank's block computations alone (the partial calls the plan asks of it), k / v of the right lengths:
    with gradients, a forward and a backward per step where attention keeps the forward's graphs
    (ald._keep_graphs), else the forward ring's call plus the backward's recompute and backward."""
    pv = ald.position_variant(variant, S)
    wanted = set(pv.tensor_names)
    device = q.device
    pos = [p.to(device) for p in positions]
    shards = [s for s in range(len(positions)) if plan.needed[rank, s]]
    kv = {s: (torch.randn(k.shape[0], k.shape[1], len(positions[s]), k.shape[3], device=device, dtype=k.dtype),
              torch.randn(v.shape[0], v.shape[1], len(positions[s]), v.shape[3], device=device, dtype=v.dtype))
          for s in shards}

    def call(qq, s):
        extra = {}
        if ald.Q_POSITIONS in wanted:
            extra[ald.Q_POSITIONS] = pos[rank]
        if ald.KV_POSITIONS in wanted:
            extra[ald.KV_POSITIONS] = pos[s]
        kk, vv = kv[s]
        if grad:
            kk, vv = kk.requires_grad_(), vv.requires_grad_()
        return pv(qq, kk, vv, backend=backend, return_lse=True,
                  **{n: t for n, t in tensors.items() if n in wanted}, **extra)

    def run():
        if not grad:
            with torch.no_grad():
                for s in shards:
                    call(q, s)
            return
        keep = ald._keep_graphs(plan)
        for s in shards:
            if not keep:
                with torch.no_grad():
                    call(q, s)                            # the forward ring
            qq = q.detach().requires_grad_()
            o, lse = call(qq, s)                          # the backward's recompute and backward
            torch.autograd.backward([o, lse], [gout, torch.zeros_like(lse)])
    return run


def torch_cp_causal(q, k, v, gout, world, device, iters, warmup, grad: bool):
    """torch's context_parallel with SDPA (is_causal, head-tail load balancing); k / v expanded to the q heads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    mesh = init_device_mesh(device.type, (world,))
    group = q.shape[1] // k.shape[1]
    qg, kg, vg = q.clone(), k.repeat_interleave(group, 1).contiguous(), v.repeat_interleave(group, 1).contiguous()
    go = gout.clone()
    bufs = [qg, kg, vg, go]
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(bufs)):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            leaves = [x.detach().requires_grad_(grad) for x in (qg, kg, vg)]

            def step():
                if grad:
                    out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
                    out.backward(go)
                else:
                    with torch.no_grad():
                        torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
            return timed(step, device, iters, warmup)


def torch_cp_documents(q, k, v, gout, lengths, world, device, iters, warmup, grad: bool):
    """torch's FlexAttention context parallel (all-gathered k / v, per-document head-tail load balancing)."""
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _context_parallel_shard,
            _ContextParallel,
        )
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _PerDocumentHeadTailLoadBalancer,
        )
    except ImportError:
        from torch.distributed.tensor.experimental._attention import (  # older layout
            _context_parallel_shard,
            _ContextParallel,
            _PerDocumentHeadTailLoadBalancer,
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    mesh = init_device_mesh(device.type, (world,))
    S = q.shape[2]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    compiled = torch.compile(flex_attention, dynamic=False)

    class Flex(torch.nn.Module):
        def forward(self, query, key, value, block_mask):
            return compiled(query, key, value, block_mask=block_mask, enable_gqa=True)

    model = parallelize_module(Flex(), mesh, _ContextParallel(seq_dim=2,
                                                              attention_type=_ContextParallel.AttentionType.FLEX))
    block_mask = create_block_mask(mask_mod, 1, 1, S, S, device=device)
    balancer = _PerDocumentHeadTailLoadBalancer([list(lengths)], world, device)
    qs, ks, vs, gs, bm = _context_parallel_shard(mesh, [q, k, v, gout, block_mask], [2, 2, 2, 2, 2], balancer)
    leaves = [x.detach().contiguous().requires_grad_(grad) for x in (qs, ks, vs)]

    def step():
        if grad:
            model(*leaves, block_mask=bm).backward(gs)
        else:
            with torch.no_grad():
                model(*leaves, block_mask=bm)
    return timed(step, device, iters, warmup)


def throughput(args, rank, world, device):
    dtype = torch.float32 if args.smoke else torch.bfloat16
    S = args.seq_len
    heads, kv_heads, dim = (4, 2, 16) if args.smoke else (32, 8, 128)
    q, k, v, gout = global_inputs(S, heads, kv_heads, dim, dtype, device, seed=1)
    cases = variants(S, heads, device)
    rows = []
    for name in ("causal", "documents"):
        variant, tensors = cases[name]
        positions = ald.shard_positions(variant, S, world, **tensors)
        plan = ald.plan_communication(variant, positions, batch=1, heads=heads, **tensors)
        mine = positions[rank].to(device)
        ql, kl, vl, gl = (x[:, :, mine].contiguous() for x in (q, k, v, gout))
        numel = kv_heads * dim * 2
        for grad in (False, True):
            label = "fwd+bwd" if grad else "fwd"
            row = {"variant": name, "seq_len": S, "pass": label, "world_size": world, "backend": args.backend}
            try:
                leaves = [x.detach().requires_grad_(grad) for x in (ql, kl, vl)]

                def ring_step():
                    if grad:
                        out = ald.attention(variant, *leaves, positions=positions, backend=args.backend,
                                            return_lse=False, **tensors)
                        out.backward(gl)
                    else:
                        with torch.no_grad():
                            ald.attention(variant, *leaves, positions=positions, backend=args.backend,
                                          return_lse=False, **tensors)
                t_ring = timed(ring_step, device, args.iters, args.warmup)
                t_own = timed(own_compute(variant, positions, plan, ql, kl, vl, tensors, args.backend, rank, S,
                                          grad, gl), device, args.iters, args.warmup, barrier=False)
                per_rank = gather_floats(t_own, device)
                t_kv = timed(ring_transfers(plan, numel, dtype, device, rank, world), device, args.iters,
                             args.warmup)
                t_comm = t_kv
                if grad:
                    t_acc = timed(ring_transfers(plan, numel, torch.float32, device, rank, world), device,
                                  args.iters, args.warmup)
                    # recompute: forward ring, backward k / v ring, dk / dv ring; kept graphs: forward ring and
                    # each dk / dv home once (about one float32 ring's bytes)
                    t_comm = (t_kv + t_acc) if ald._keep_graphs(plan) else (2 * t_kv + t_acc)
                exposed = max(0.0, t_ring - max(per_rank))
                row.update({
                    "time_s": t_ring, "tokens_per_s_per_gpu": S / (t_ring * world),
                    "balance": max(per_rank) / statistics.mean(per_rank),
                    "compute_s_per_rank": per_rank, "transfers_s": t_comm,
                    "comm_hidden": (min(1.0, max(0.0, 1.0 - exposed / t_comm)) if t_comm > 0 else 1.0),
                    "plan": plan.summary(),
                })
            except Exception as e:  # noqa: BLE001
                row.update({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
            # one GPU, the whole sequence (rank 0; the others wait)
            single = None
            if not args.skip_single:
                if rank == 0:
                    try:
                        leaves1 = [x.detach().requires_grad_(grad) for x in (q, k, v)]

                        def single_step():
                            if grad:
                                variant(*leaves1, backend=args.backend, **tensors).backward(gout)
                            else:
                                with torch.no_grad():
                                    variant(*leaves1, backend=args.backend, **tensors)
                        single = S / timed(single_step, device, args.iters, args.warmup, barrier=False)
                    except Exception as e:  # noqa: BLE001
                        row["single_gpu_error"] = f"{type(e).__name__}: {e}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                dist.barrier()
            row["single_gpu_tokens_per_s"] = single
            torch_cp = None
            if not args.smoke and not args.skip_torch:
                try:
                    if name == "causal":
                        t = torch_cp_causal(q, k, v, gout, world, device, args.iters, args.warmup, grad)
                    else:
                        t = torch_cp_documents(q, k, v, gout, doc_lengths(S), world, device, args.iters,
                                               args.warmup, grad)
                    torch_cp = S / (t * world)
                except Exception as e:  # noqa: BLE001
                    row["torch_cp_error"] = f"{type(e).__name__}: {e}"[:600]
                ok = gather_floats(1.0 if torch_cp is not None else 0.0, device)
                if min(ok) == 0.0:
                    torch_cp = None
            row["torch_cp_tokens_per_s"] = torch_cp
            if row.get("tokens_per_s_per_gpu") and single:
                row["vs_single_gpu"] = row["tokens_per_s_per_gpu"] / single
            if rank == 0:
                print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ not in ("trace",)}), flush=True)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------------

def fmt(x, digits=0):
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:,.{digits}f}" if digits == 0 else f"{x:.{digits}f}"


def write(result: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# Context parallelism on {result['device']} x {result['world_size']}", "",
             f"torch {result['torch']}; attnlang backend {result['backend']}; B=1, Hq=32, Hkv=8, D=128, bf16. "
             "Tokens/s per GPU = S / (time x W); single GPU = S / time on one GPU; torch CP = torch's "
             "context_parallel (causal: SDPA, k / v expanded to the q heads; documents: FlexAttention CP). "
             "balance = max / mean of each rank's own block compute time; comm hidden = share of the ring's "
             "transfer time not added to the step (see benchmarks/bench_cp.py).", "",
             "| variant | S | pass | tokens/s/GPU | single GPU tokens/s | vs single | torch CP tokens/s/GPU | "
             "balance | comm hidden | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        note = "; ".join(r[k] for k in ("error", "single_gpu_error", "torch_cp_error") if r.get(k))
        lines.append(f"| {r['variant']} | {r['seq_len']} | {r['pass']} | {fmt(r.get('tokens_per_s_per_gpu'))} | "
                     f"{fmt(r.get('single_gpu_tokens_per_s'))} | {fmt(r.get('vs_single_gpu'), 3)} | "
                     f"{fmt(r.get('torch_cp_tokens_per_s'))} | {fmt(r.get('balance'), 3)} | "
                     f"{fmt(r.get('comm_hidden'), 3)} | {note[:300]} |")
    if result.get("check"):
        lines += ["", "## Correctness: NCCL ring against one GPU (max |diff| / max |single GPU|, worst rank)", "",
                  "| variant | S | backend | ok | errors |", "|---|---|---|---|---|"]
        for r in result["check"]:
            errs = ", ".join(f"{k} {v:.2e}" for k, v in (r.get("rel_error") or {}).items()) or r.get("error", "")
            lines.append(f"| {r['variant']} | {r['seq_len']} | {r['backend']} | {r.get('ok_all_ranks')} | "
                         f"{errs} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--check-len", type=int, default=8192)
    ap.add_argument("--backend", default="fa4")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=3e-2, help="max relative error (bf16) for the check")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, eager, tiny sizes: the script's own test")
    ap.add_argument("--out", default="cp_h200")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend, args.seq_len, args.check_len, args.iters, args.warmup = "eager", 2048, 512, 1, 0
        args.out = args.out if args.out != "cp_h200" else "cp_smoke"
    rank, world, device = setup(args.smoke)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world_size": world, "torch": torch.__version__, "backend": args.backend, "rows": [], "check": []}
    if not args.skip_check:
        result["check"] = check(args, rank, world, device)
    if not args.check_only:
        result["rows"] = throughput(args, rank, world, device)
    if rank == 0:
        write(result, args.out)
        print(f"wrote {RESULTS / args.out}.json / .md", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
