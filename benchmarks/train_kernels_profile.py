"""Which CUDA kernels a warm training step (forward + backward) launches, and their device time, for attnlang's
fa4 backend against FA4 called with the same kernel arguments (hd64 sliding window, the shape suite's hd64 group):
tells extra or slower kernels from host time. ``python benchmarks/train_kernels_profile.py --out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shape", type=int, nargs=4, default=(4, 16, 4096, 64))
    args = ap.parse_args()

    import attnlang as al
    import attnlang.backends.fa4 as fa4
    B, H, S, D = args.shape
    variant = al.compile(mask="0 <= q_idx - kv_idx < 1024")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    plan = variant._plan(q, k, v, None, "fa4", False, None, {})
    _, _, kwargs = fa4.kernel_arguments(q, k, v, plan)
    flash = fa4._flash()
    calls = {
        "attnlang_fa4": lambda a, b, c: variant(a, b, c, backend="fa4"),
        "attnlang_fa4_no_replay": lambda a, b, c: variant(a, b, c, backend="fa4", kernel_options={"replay": False}),
        "fa4_attnlang_args": lambda a, b, c: flash.flash_attn_func(
            a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), **kwargs)[0].transpose(1, 2),
    }
    lines = []
    for who, call in calls.items():
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def step():
            call(qg, kg, vg).backward(dout)
        lines += profiled(who, "fwd+bwd", step, 10, "steps", 14, grad_to_none=[qg, kg, vg])
    write(args.out, "train_kernels_profile.txt", lines)


def profiled(who: str, what: str, step, n: int, unit: str, rows: int, grad_to_none=None,
             ms_digits: int = 3) -> list[str]:
    """``step`` warmed up (``n`` calls), timed by do_bench (median, ms), and its CUDA kernels over ``n`` calls
    ("steps" or "calls": ``unit``) tabled by torch.profiler (``rows`` rows): the report's two entries, printed as
    they come."""
    from triton.testing import do_bench
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    ms = do_bench(step, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    head = f"===== {who}: do_bench {what} {ms:.{ms_digits}f} ms; kernels of {n} {unit}"
    print(head, flush=True)
    print(table, flush=True)
    return [head, table]


def write(out_dir: str, name: str, lines: list[str]) -> None:
    """``lines`` as the text file ``out_dir/name``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
