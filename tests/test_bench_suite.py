"""CPU checks of benchmarks/bench_kernels.py --suite: every suite variant, as attnlang runs it, computes what the
Flex contenders' score_mod / mask_mod compute (so the table compares like with like), at shrunken shapes of each
group, against a dense float64 reference; the document lengths; the markdown report."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_kernels as bk  # noqa: E402


def _small(group: dict) -> dict:
    """The group at a CPU size, keeping its kind (GQA or not, decode or not)."""
    small = dict(group, B=2, Hq=4, Hkv=2 if group["Hq"] != group["Hkv"] else 4, D=16)
    if group["Sq"] == group["Skv"]:
        small.update(Sq=160, Skv=160)
    else:
        small.update(Sq=min(group["Sq"], 5), Skv=150)
    return small


def _dense_reference(q, k, v, score_mod, mask_mod):
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    qi = torch.arange(Sq)[None, None, :, None]
    ki = torch.arange(Skv)[None, None, None, :]
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki)
    allowed = mask_mod(b, h, qi, ki).expand_as(s)
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("gname", sorted(bk.SUITE_GROUPS))
@pytest.mark.parametrize("name", bk.SUITE_VARIANTS)
def test_suite_variant_matches_the_flex_contenders_mods(gname, name, monkeypatch):
    monkeypatch.setattr(bk, "_window", lambda group: 37)  # a window shorter than the shrunken rows
    group = _small(bk.SUITE_GROUPS[gname])
    if name == "document_random" and bk._decode(group):
        pytest.skip("documents are not a decode variant")
    import attnlang as al
    tensors = bk.suite_tensors(name, group, "cpu")
    if name == "document_random":
        tensors["doc"] = bk.document_ids(group["Sq"], "cpu", seed=3)
    tensors = {n: (t.double() if t.is_floating_point() else t) for n, t in tensors.items()}
    score, mask = bk.suite_variant(name, group)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(group["B"], group["Hq"], group["Sq"], group["D"], dtype=torch.float64, generator=g)
    k = torch.randn(group["B"], group["Hkv"], group["Skv"], group["D"], dtype=torch.float64, generator=g)
    v = torch.randn(group["B"], group["Hkv"], group["Skv"], group["D"], dtype=torch.float64, generator=g)
    got = al.compile(score=score, mask=mask)(q, k, v, backend="eager", **tensors)
    score_mod, mask_mod = bk._suite_flex_mods(name, group, tensors)
    torch.testing.assert_close(got, _dense_reference(q, k, v, score_mod, mask_mod), atol=1e-5, rtol=1e-5)


def test_document_lengths_are_seeded_and_fill_the_row():
    a, b = bk.document_lengths(4096), bk.document_lengths(4096)
    assert a == b and sum(a) == 4096 and all(1 <= n <= 3000 for n in a)
    assert all(64 <= n for n in a[:-1])
    assert bk.document_lengths(4096, seed=1) != a
    ids = bk.document_ids(4096, "cpu")
    assert ids.shape == (4096,) and bool((ids[1:] >= ids[:-1]).all())


def test_suite_markdown_marks_the_fastest_and_the_ratios():
    doc = {"device": "H200", "versions": {}, "groups": {"gqa": {
        "shape": {"B": 2, "Hq": 32, "Hkv": 8, "Sq": 4096, "Skv": 4096, "D": 128},
        "variants": {"causal": {"sdpa_fwd_ms": 0.5, "flex_flash_fwd_ms": 0.4, "attnlang_fa4_fwd_ms": 0.41,
                                "attnlang_auto_fwd_ms": 0.42, "flex_flash_fwdbwd_ms": 1.0,
                                "attnlang_fa4_fwdbwd_ms": 0.9},
                     "alibi": {"attnlang_fa4_error": "RuntimeError: boom"}}}}}
    md = bk.suite_markdown(doc)
    assert "| causal | 0.500 | 0.400 | 0.410 | 0.420 | flex_flash | 1.02 | 1.02 |" in md
    assert "forward+backward" in md and "alibi / attnlang_fa4: RuntimeError: boom" in md


def test_suite_jobs_cover_every_group_and_contender():
    makers = {c for c in (*bk.SUITE_CONTENDERS, *bk.SUITE_EXPERIMENTS)}
    assert {"fa4_varlen", "attnlang_auto", "flex_default", "fa4_builtin"} <= makers
    assert set(bk.SUITE_GROUPS) == {"gqa", "hd64", "long", "decode_q1", "decode_q16"}
    assert not bk.SUITE_GROUPS["long"]["bwd"] and bk.SUITE_GROUPS["gqa"]["bwd"]


def test_suite_main_runs_with_stand_ins(tmp_path, monkeypatch):
    """The suite's driver end to end on the CPU: kernels replaced by stand-ins, so what is checked is the loop,
    the merge into shapes.json and the report."""
    import json

    from attnlang.backends import fa4
    monkeypatch.setattr(fa4, "_flash", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    made = []

    def maker(contender, name, group, tensors):
        made.append((contender, name))
        if contender == "flex_default" and not bk._decode(group):
            return None
        if contender == "sdpa" and name != "causal":
            return None
        return lambda q, k, v: torch.zeros(1)

    def fake_bench(fn, q, k, v, dout, do_bwd, reps):
        return 0.5, 1.0, (3.0 if do_bwd else None), fn(q, k, v)

    monkeypatch.setattr(bk, "suite_maker", maker)
    monkeypatch.setattr(bk, "bench", fake_bench)
    monkeypatch.setattr(bk, "suite_inputs", lambda group, seed=0: (torch.zeros(1),) * 4)
    monkeypatch.setattr(bk, "suite_tensors", lambda name, group, device: {})
    monkeypatch.setattr(bk, "describe_varlen", lambda *a, **k: "stand-in lowering")
    bk.main(["--suite", "--groups", "gqa", "decode_q1", "--variants", "causal", "document_random",
             "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "shapes.json").read_text())
    gqa = doc["groups"]["gqa"]["variants"]
    assert gqa["causal"]["sdpa_fwdbwd_ms"] == 3.0 and "sdpa_fwd_ms" not in gqa["document_random"]
    assert "document_random" not in doc["groups"]["decode_q1"]["variants"]
    assert doc["groups"]["decode_q1"]["variants"]["causal"]["flex_default_fwd_ms"] == 1.0
    assert gqa["document_random"]["attnlang_fa4_lowering"] == "stand-in lowering"
    # a second run of one group merges into the file instead of replacing it
    bk.main(["--suite", "--groups", "gqa", "--variants", "causal", "--contenders", "sdpa", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "shapes.json").read_text())
    assert "decode_q1" in doc["groups"] and "flex_flash_fwd_ms" in doc["groups"]["gqa"]["variants"]["causal"]
    assert "## gqa" in (tmp_path / "shapes.md").read_text()
    # --rounds 3: every cell measured three times, round after round; it keeps the samples and their median
    times = iter([1.0, 5.0, 4.0, 1.0, 3.0, 2.0])  # sdpa, fa4_builtin, sdpa, ...
    monkeypatch.setattr(bk, "bench", lambda fn, q, k, v, dout, do_bwd, reps: (0.5, next(times), None, fn(q, k, v)))
    bk.main(["--suite", "--groups", "gqa", "--variants", "causal", "--contenders", "sdpa", "fa4_builtin",
             "--rounds", "3", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "shapes.json").read_text())["groups"]["gqa"]["variants"]["causal"]
    assert row["sdpa_fwd_samples"] == [1.0, 4.0, 3.0] and row["sdpa_fwd_ms"] == 3.0
    assert row["fa4_builtin_fwd_samples"] == [5.0, 1.0, 2.0] and row["fa4_builtin_fwd_ms"] == 2.0


def test_suite_merge_unions_cells(tmp_path):
    import json
    shape = {"B": 1, "Hq": 1, "Hkv": 1, "Sq": 1, "Skv": 1, "D": 1}
    def run(groups):
        return {"device": "d", "versions": {},
                "groups": {g: {"shape": shape, "variants": rows} for g, rows in groups.items()}}
    a = run({"gqa": {"causal": {"sdpa_fwd_ms": 1.0, "attnlang_fa4_fwd_ms": 2.0}}})
    b = run({"gqa": {"causal": {"attnlang_fa4_fwd_ms": 0.9}}, "long": {"alibi": {"flex_flash_fwd_ms": 3.0}}})
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    bk.main(["--suite-merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out" / "shapes.json").read_text())
    assert doc["groups"]["gqa"]["variants"]["causal"] == {"sdpa_fwd_ms": 1.0, "attnlang_fa4_fwd_ms": 0.9}
    assert "long" in doc["groups"] and (tmp_path / "out" / "shapes.md").exists()
