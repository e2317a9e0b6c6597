"""benchmarks/gpu_matrix.py on the CPU: its independent float64 references agree with attnlang's eager reference,
its cells are the ones the issue lists, and one cell runs end to end (auto -> eager on the CPU)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import attnlang as al

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_matrix.py"
_spec = importlib.util.spec_from_file_location("gpu_matrix", _PATH)
gm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gm)


@pytest.mark.parametrize("variant", sorted(gm.VARIANTS))
@pytest.mark.parametrize("gqa", [False, True])
def test_references_agree_with_eager(variant, gqa):
    cell = dict(backend="fa4", head_dim=8, gqa=gqa, grad=True, variant=variant)
    q, k, v, dout, tensors = gm._inputs(cell, torch, "cpu")
    q, k, v = (t.double() for t in (q, k, v))
    tensors = {n: (t.double() if t.is_floating_point() else t) for n, t in tensors.items()}
    out, lse = gm.reference(variant, q, k, v, tensors, torch)
    score, mask, _, _ = gm.VARIANTS[variant]
    ref, ref_lse = al.compile(score=score, mask=mask)(q, k, v, backend="eager", return_lse=True, **tensors)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.double(), rtol=1e-6, atol=1e-6)  # eager lse: float32


def test_cells_cover_the_matrix():
    cells = [c for c in gm.all_cells() if not c.get("unguarded")]
    assert len(cells) == 2 * 10 * 2 * 2 * 5
    ids = [gm.cell_id(c) for c in gm.all_cells()]
    assert len(set(ids)) == len(ids)
    assert {c["head_dim"] for c in cells} == {8, 16, 32, 48, 64, 80, 96, 128, 192, 256}
    evidence = [c for c in gm.all_cells() if c.get("unguarded")]
    assert evidence and all(c["backend"] == "fa4" and c["grad"] for c in evidence)


def test_tolerances_are_multiples_of_bf16_roundoff():
    assert gm.TOL["out"] == 8 * 2 ** -8 and gm.TOL["dq"] == 32 * 2 ** -8


def test_one_cell_end_to_end_on_the_cpu():
    # fa4 declines on the CPU, so auto runs eager: the cell is "declined" to eager and passes the tolerances
    r = gm.run_cell(dict(backend="fa4", head_dim=16, gqa=True, grad=True, variant="odd"), device="cpu")
    assert r["outcome"] == "declined", r
    assert r["declined_to"] == "eager" and "CUDA" in r["reason"]
    assert set(r["errors"]) == {"out", "lse", "dq", "dk", "dv"} and math.isfinite(r["max_rel_err"])
    assert r["max_rel_err"] < gm.TOL["out"]


def test_list_and_filter(capsys):
    assert gm.main(["--list", "--cells", r"^fa4/d48/gqa/grad/"]) == 0
    lines = capsys.readouterr().out.split()
    assert "fa4/d48/gqa/grad/causal" in lines and "fa4/d48/gqa/grad/causal/unguarded" in lines
    assert all(line.startswith("fa4/d48/gqa/grad/") for line in lines)
