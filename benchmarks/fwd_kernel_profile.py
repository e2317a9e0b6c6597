"""Device time of the forward kernel itself (torch.profiler, 20 warm calls) for attnlang's fa4 backend against
FA4's flash_attn_func with the builtin flags, at the shape suite's hd64 causal cell (B=4 H=16 S=4096 D=64 bf16):
tells a slower kernel from host or launch overhead. ``python benchmarks/fwd_kernel_profile.py --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_kernels_profile import profiled, write  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shape", type=int, nargs=4, default=(4, 16, 4096, 64))
    args = ap.parse_args()
    from flash_attn.cute import flash_attn_func

    import attnlang as al
    B, H, S, D = args.shape
    variant = al.compile(mask="q_idx >= kv_idx")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    calls = {
        "attnlang_fa4": lambda: variant(q, k, v, backend="fa4"),
        "fa4_builtin": lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               causal=True),
    }
    lines = []
    with torch.no_grad():
        for who, call in calls.items():
            lines += profiled(who, "fwd", call, 20, "calls", 6, ms_digits=4)
    write(args.out, "fwd_kernel_profile.txt", lines)


if __name__ == "__main__":
    main()
