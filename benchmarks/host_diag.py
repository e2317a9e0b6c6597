"""Where a warm fa4 call spends host time on the GPU host, and whether it syncs the device (issues 14 and 15).

    python benchmarks/host_diag.py [--rows sinks_window document_random] [--n 50]

For each bench_kernels row (BENCHMARKS.md's shape B=4 H=16 S=8192 D=128 bf16, inputs [B, H, S, D] contiguous as
the kernel benchmark makes them): attnlang backend="fa4" (also with kernel_options={"replay": False}: FA4's host
functions on every call, attnlang.backends.fa4_replay off), backend="auto" and FA4 called directly (the
benchmark's own contender where it has one), inference and forward+backward:
- host_us: wall time of n calls issued back to back after a sync, divided by n (the GPU time per call is reported
  beside it: host_us below it means the call is not host-bound);
- gpu_us: CUDA-event time per call over the same n calls;
- sync: the first device synchronisation a warm call makes (torch.cuda.set_sync_debug_mode("error")), or "none";
- a cProfile of n warm attnlang_fa4 calls, the top functions by own time, in <out>/<name>_profile.txt.
Writes <out>/<name>.json and .md (default name host_diag_gpu).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(Path(__file__).resolve().parent))  # bench_kernels (attnlang itself from its install)


def _timed(fn, n: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    host = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(sorted(host)[1], 1), round(start.elapsed_time(end) / n * 1e3, 1)


def _sync_of(fn) -> str:
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except Exception as exc:  # noqa: BLE001 - the first synchronising call, with where it came from
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                  for f in traceback.extract_tb(exc.__traceback__)][-6:]
        return f"{type(exc).__name__}: {str(exc)[:160]} @ " + " <- ".join(reversed(frames))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _profile(fn, n: int, top: tuple[int, int] = (30, 40)) -> str:
    """cProfile of ``n`` warm calls of ``fn``: the ``top`` functions by own time, then by cumulative time."""
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top[0])
    stats.sort_stats("cumtime").print_stats(top[1])
    return text.getvalue()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="*", default=["sinks_window", "document_random", "causal"])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--shape", type=int, nargs=4, default=(4, 16, 8192, 128), metavar=("B", "H", "S", "D"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="host_diag_gpu")
    args = ap.parse_args(argv)
    import bench_kernels as bk

    import attnlang.backends.fa4 as fa4
    from attnlang.backends import fa4_replay
    fa4._flash()
    B, H, S, D = args.shape
    torch.manual_seed(0)
    base = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    results, profiles = {}, []
    for name in args.rows:
        tensors = bk.named_tensors(name, S, H, "cuda")
        variant = bk.variant_of(name)
        direct = bk.make_fa4_builtin(name, tensors, S, H) or bk.make_fa4_varlen(name, tensors, S, H)
        calls = {"attnlang_fa4": lambda q, k, v: variant(q, k, v, backend="fa4", **tensors),
                 "attnlang_auto": lambda q, k, v: variant(q, k, v, **tensors),
                 # FA4's host functions on every call (attnlang.backends.fa4_replay off): what the replay saves
                 "attnlang_fa4_no_replay": lambda q, k, v: variant(q, k, v, backend="fa4",
                                                                   kernel_options={"replay": False}, **tensors)}
        if direct is not None:
            calls["fa4_direct"] = direct
        if not tensors:
            # FA4 called with the very arguments attnlang's fa4 backend gives it (kernel_arguments): tells a
            # difference in kernel arguments from one in host code
            plan = variant._plan(*base[:3], None, "fa4", False, None, {})
            _, _, fa_kwargs = fa4.kernel_arguments(*base[:3], plan)
            row_kwargs = {k_: v_ for k_, v_ in fa_kwargs.items() if v_ is not None}
            print(name, "attnlang's FA4 arguments:", row_kwargs, flush=True)
            flash = fa4._flash()
            calls["fa4_attnlang_args"] = lambda q, k, v, kw=fa_kwargs, fl=flash: fl.flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)[0].transpose(1, 2)
            # the custom op a compiled graph calls (attnlang.op): its dispatch on top of the plain call
            from attnlang import op
            key = op.call_key(variant._op_config, "fa4", None, False, None, ())
            calls["attnlang_op"] = lambda q, k, v: torch.ops.attnlang.attention(
                q, k, v, [], key, op.grad_bits(q, k, v, []))[0]
        row = {}
        for who, call in calls.items():
            q, k, v, dout = base
            before = {id(r) for r in fa4_replay._ALL}
            try:
                with torch.no_grad():
                    row[f"{who}_host_us"], row[f"{who}_gpu_us"] = _timed(lambda: call(q, k, v), args.n)
                    row[f"{who}_sync"] = _sync_of(lambda: call(q, k, v))
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                def train():
                    out = call(qg, kg, vg)
                    out = out[0] if isinstance(out, tuple) else out
                    out.backward(dout)
                row[f"{who}_train_host_us"], row[f"{who}_train_gpu_us"] = _timed(train, max(args.n // 5, 5))
                row[f"{who}_train_sync"] = _sync_of(train)
                if who in ("attnlang_fa4", "attnlang_op", "fa4_direct"):
                    with torch.no_grad():
                        profiles.append(f"===== {name} {who} inference, {args.n} calls\n"
                                        + _profile(lambda: call(q, k, v), args.n))
                    profiles.append(f"===== {name} {who} forward+backward, 10 calls\n" + _profile(train, 10))
            except Exception as exc:  # noqa: BLE001 - recorded, the other rows still run
                row[f"{who}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            # where each FA4 host call of this contender ended up (fa4_replay: "replay", or "own" and why)
            row[f"{who}_replays"] = sorted({f"{'fwd' if r.exact else 'bwd'}: {r.state}"
                                            + (f" ({r.why})" if r.why else "")
                                            for r in list(fa4_replay._ALL) if id(r) not in before})
            print(name, who, {k_: v_ for k_, v_ in row.items() if k_.startswith(who)}, flush=True)
        results[name] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
           "calls": args.n, "rows": results}
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{args.name}_profile.txt").write_text("\n".join(profiles))
    md = [f"# Host time of warm fa4 calls, {doc['device']}, B, H, S, D = {tuple(args.shape)} bf16", "",
          "| row | who | host us | GPU us | train host us | train GPU us | sync (inference / train) | replays |",
          "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        for who in ("attnlang_fa4", "attnlang_fa4_no_replay", "attnlang_auto", "attnlang_op", "fa4_attnlang_args",
                    "fa4_direct"):
            if f"{who}_host_us" in row or f"{who}_error" in row:
                md.append(f"| {name} | {who} | {row.get(f'{who}_host_us', '')} | {row.get(f'{who}_gpu_us', '')} | "
                          f"{row.get(f'{who}_train_host_us', '')} | {row.get(f'{who}_train_gpu_us', '')} | "
                          f"{row.get(f'{who}_sync', row.get(f'{who}_error', ''))} / "
                          f"{row.get(f'{who}_train_sync', '')} | {'; '.join(row.get(f'{who}_replays', []))} |")
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
