"""Why the compiled prefill of bench_compile's Llama-shaped model is slower with attnlang than with sdpa (issue 18):
the compiled prefill (no_grad, eval) of each implementation, timed, then three calls under torch.profiler.

    python benchmarks/prefill_profile.py --out DIR     # writes DIR/prefill_profile.txt

Prints the per-call wall time (mean of 20 after warm-up) and the profiler's top ops by device and by host time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # bench_compile (attnlang itself from its install)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args(argv)
    import bench_compile as bc
    from torch.profiler import ProfilerActivity, profile

    import attnlang.integrations.transformers as alt
    alt.register()
    shape = dict(layers=4, hidden=1024, heads=8, kv_heads=2, head_dim=128, vocab=32000)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), device="cuda")
    text = []
    for impl in ("attnlang", "sdpa"):
        model = bc._model(impl, **shape).eval()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            for _ in range(3):
                compiled(ids)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                compiled(ids)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 20 * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    compiled(ids)
                torch.cuda.synchronize()
        events = prof.key_averages()
        attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
        text.append(f"===== {impl}: prefill wall {wall:.3f} ms per call (20 calls)\n")
        text.append(events.table(sort_by="self_" + attr, row_limit=22) + "\n")
        text.append(events.table(sort_by="self_cpu_time_total", row_limit=22) + "\n")
        print(impl, f"{wall:.3f} ms", flush=True)
        del model, compiled
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_profile.txt").write_text("".join(text))


if __name__ == "__main__":
    main()
