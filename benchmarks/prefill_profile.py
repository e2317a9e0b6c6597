"""Why the compiled prefill and train step of bench_compile's Llama-shaped model are slower with attnlang than
with sdpa (issue 18): for each implementation and each of prefill (no_grad, eval) and train step (forward +
backward), the per-call wall time, the host time to issue one call (returned, before the device finishes), the
host syncs one warm call makes (torch.cuda.set_sync_debug_mode, with the Python stack of each) and three calls
under torch.profiler.

    python benchmarks/prefill_profile.py --out DIR     # writes DIR/prefill_profile.txt

A call whose issue time is close to its wall time is host-bound; a sync inside a call serialises host and device.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # bench_compile (attnlang itself from its install)


def _syncs(fn) -> list[str]:
    """The host syncs one call of fn makes, each with the innermost frames of its Python stack."""
    found: list[str] = []
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.format_stack()[:-1] if "warnings.py" not in f]
        found.append(f"{message}\n" + "".join(stack[-8:]))

    torch.cuda.synchronize()
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    torch.cuda.synchronize()
    return found


def _measure(name: str, fn, text: list) -> None:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 20 * 1e3
    issue = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    syncs = _syncs(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    busy = sum(getattr(e, "self_" + attr, 0) for e in events) / 3 / 1e3
    head = (f"===== {name}: wall {wall:.3f} ms per call (20 calls), host issue {min(issue):.3f} ms (min of 10), "
            f"device busy {busy:.3f} ms per call, {len(syncs)} host syncs in one call\n")
    print(head, end="", flush=True)
    text.append(head)
    text.extend(f"--- sync {i}: {s}\n" for i, s in enumerate(syncs[:6]))
    text.append(events.table(sort_by="self_" + attr, row_limit=22) + "\n")
    text.append(events.table(sort_by="self_cpu_time_total", row_limit=22) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)
    import bench_compile as bc

    import attnlang.integrations.transformers as alt
    alt.register()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    shape = dict(layers=4, hidden=1024, heads=8, kv_heads=2, head_dim=128, vocab=32000)
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), device="cuda")
    text: list[str] = []
    for impl in ("attnlang", "sdpa"):
        model = bc._model(impl, **shape)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        if not args.skip_train:
            model.train()

            def train_step(model=model, compiled=compiled):
                model.zero_grad(set_to_none=True)
                compiled(ids, labels=ids).loss.backward()
            _measure(f"{impl} train step", train_step, text)
        model.eval()
        with torch.no_grad():
            _measure(f"{impl} prefill", lambda c=compiled: c(ids), text)
        del model, compiled
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_profile.txt").write_text("".join(text))


if __name__ == "__main__":
    main()
