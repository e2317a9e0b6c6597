"""Host (CPU) time per call of the fa4 backend: what attnlang adds in front of FlashAttention-4's own host work.

    python benchmarks/bench_host.py            # CPU, no GPU: FA4 replaced by a stub returning preallocated buffers
    python benchmarks/bench_host.py --gpu      # on a Hopper GPU: the real kernel, host time of each call

CPU mode: ``attnlang.backends.fa4._flash`` becomes a stub whose ``flash_attn_func`` / ``_flash_attn_fwd`` return
buffers allocated once, and the device check answers "sm90"; so a call's time is attnlang's own work (the plan,
the backend's checks, argument preparation, the transposes). ``direct`` is the stub called with arguments prepared
once (what a caller of FA4 pays in front of FA4, its layout transposes included). q / k / v are zero-stride
expanded views: host work does not read them. Writes <out>/host_cpu.{json,md} (``--name``).

GPU mode: per-call host time = wall time of N calls issued back to back after a sync, divided by N (N is small
enough that the launch queue never fills, so no call waits for the GPU), for attnlang fa4, attnlang auto and
flash_attn_func called directly on prepared [B, S, H, D] views; and the CUDA-event time per call. Writes
<out>/host_gpu.{json,md}.

Shapes: decode (B=16, Hq=32, Hkv=8, kv_len 16384, q_len 1, D=128, bf16), the issue-15 shape; variants: full
(``True``), bottom-right causal, a 4096 window.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# attnlang comes from its install (`pip install -e .` here, a regular install on the GPU host): the checkout's own
# attnlang/ has no backends/ (package-dir maps it), so ROOT must not go in front of the installed package

VARIANTS = {
    "full": "True",
    "causal_bottom_right": "kv_idx <= q_idx + kv_len - q_len",
    "window_4096": "kv_idx <= q_idx + kv_len - q_len & kv_idx > q_idx + kv_len - q_len - 4096",
}
SHAPE = dict(B=16, Hq=32, Hkv=8, q_len=1, kv_len=16384, D=128)


class StubFA4:
    """flash_attn.cute's interface with no work behind it: outputs are buffers allocated once per shape."""

    def __init__(self):
        self.buffers = {}

    def _out(self, q, v, lse):
        key = (tuple(q.shape), v.shape[-1], q.dtype, lse)
        got = self.buffers.get(key)
        if got is None:
            B, S, H = q.shape[:3]
            got = (torch.empty(B, S, H, v.shape[-1], dtype=q.dtype), torch.empty(B, H, S) if lse else None)
            self.buffers[key] = got
        return got

    def flash_attn_func(self, q, k, v, return_lse=False, **_):
        return self._out(q, v, return_lse)

    def _flash_attn_fwd(self, q, k, v, return_lse=False, out=None, lse=None, **_):
        o, l_ = self._out(q, v, return_lse)
        return (o if out is None else out), (l_ if lse is None else lse), None, None, None


def _per_call_us(fn, n: int, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the mean time of ``n`` calls, in microseconds."""
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(runs)[len(runs) // 2]


def cpu(args) -> dict:
    import attnlang as al
    from attnlang.backends import fa4
    stub = StubFA4()
    fa4._flash = lambda: stub
    fa4._device_problem = lambda q: None
    s = SHAPE
    dtype = torch.bfloat16
    q = torch.zeros(1, 1, 1, 1, dtype=dtype).expand(s["B"], s["Hq"], s["q_len"], s["D"])
    k = torch.zeros(1, 1, 1, 1, dtype=dtype).expand(s["B"], s["Hkv"], s["kv_len"], s["D"])
    results = {}
    for name, mask in VARIANTS.items():
        variant = al.compile(mask=mask)
        plan = variant._plan(q, k, k, None, "fa4", False, None, {})
        _, _, kwargs = fa4.kernel_arguments(q, k, k, plan)
        row = {
            "attnlang_fa4_us": _per_call_us(lambda: variant(q, k, k, backend="fa4"), args.n),
            "plan_us": _per_call_us(lambda: variant._plan(q, k, k, None, "fa4", False, None, {}), args.n),
            "unsupported_us": _per_call_us(lambda: fa4.unsupported(q, plan), args.n),
            "attention_us": _per_call_us(lambda: fa4.attention(q, k, k, plan), args.n),
            "direct_us": _per_call_us(lambda: stub.flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), **kwargs), args.n),
        }
        row["added_us"] = row["attnlang_fa4_us"] - row["direct_us"]
        results[name] = {key: round(val, 2) for key, val in row.items()}
        print(name, results[name], flush=True)
    return results


def gpu(args) -> dict:
    import attnlang as al
    from attnlang.backends import fa4
    fa = fa4._flash()
    s = SHAPE
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(s["B"], s["Hq"], s["q_len"], s["D"], device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(s["B"], s["Hkv"], s["kv_len"], s["D"], device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(s["B"], s["Hkv"], s["kv_len"], s["D"], device="cuda", dtype=torch.bfloat16, generator=g)
    results = {}
    for name, mask in VARIANTS.items():
        variant = al.compile(mask=mask)
        plan = variant._plan(q, k, v, None, "fa4", False, None, {})
        _, _, kwargs = fa4.kernel_arguments(q, k, v, plan)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        calls = {
            "attnlang_fa4": lambda: variant(q, k, v, backend="fa4"),
            "attnlang_auto": lambda: variant(q, k, v),
            "fa4_direct": lambda: fa.flash_attn_func(qt, kt, vt, **kwargs),
        }
        row = {}
        with torch.no_grad():
            for who, fn in calls.items():
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                host = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(args.n):
                        fn()
                    host.append((time.perf_counter() - t0) / args.n * 1e6)
                    torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.n):
                    fn()
                end.record()
                torch.cuda.synchronize()
                row[f"{who}_host_us"] = round(sorted(host)[2], 2)
                row[f"{who}_per_call_us"] = round(start.elapsed_time(end) / args.n * 1e3, 2)
        results[name] = row
        print(name, row, flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="calls per timing (default 2000 CPU, 100 GPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default=None, help="file stem (default host_cpu / host_gpu)")
    args = ap.parse_args(argv)
    args.n = args.n or (100 if args.gpu else 2000)
    results = gpu(args) if args.gpu else cpu(args)
    name = args.name or ("host_gpu" if args.gpu else "host_cpu")
    doc = {"mode": "gpu" if args.gpu else "cpu (FA4 stubbed)", "shape": SHAPE, "calls_per_timing": args.n,
           "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
           "variants": results}
    if args.gpu:
        doc["device"] = torch.cuda.get_device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    cols = list(next(iter(results.values())))
    md = [f"# Host time per call, {doc['mode']}: decode B=16 Hq=32 Hkv=8 q_len=1 kv_len=16384 D=128 bf16", "",
          f"python {doc['python']}, torch {doc['torch']}; microseconds, median of 5 runs of {args.n} calls", "",
          "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [f"| {n} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |" for n, r in results.items()]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
