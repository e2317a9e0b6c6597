"""The `attnlang` command: check, explain (--png) and demo."""

import subprocess
import sys

import pytest
import torch

import attnlang as al
from attnlang.cli import allowed_fraction, main


def test_check_ok_exits_0(capsys):
    assert main(["check", "--mask", "0 <= q_idx - kv_idx < window", "--param", "window=256"]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_shows_a_score_term_moved_to_lse(capsys):
    # score + bias[h] simplifies to score with bias[h] added back to lse: the line must still show bias[h]
    assert main(["check", "--score", "score + bias[h]", "--mask", "q_idx >= kv_idx"]) == 0
    out = capsys.readouterr().out
    assert "lse shift: bias[h]" in out and "mask: q_idx >= kv_idx" in out


def test_check_bad_input_exits_2_with_a_caret(capsys):
    assert main(["check", "--mask", "q_idx >= kv_idx & doc[q_idx] = doc[kv_idx]"]) == 2
    err = capsys.readouterr().err
    assert "line 1, column 30" in err
    assert err.splitlines()[-1] == " " * (4 + 29) + "^"


@pytest.mark.parametrize("args, word", [
    (["--param", "window"], "NAME=VALUE"),
    (["--param", "window=abc"], "not an int"),
    (["--param", "window=1", "--param", "window=2"], "twice"),
])
def test_bad_params_exit_2(args, word, capsys):
    assert main(["check", "--mask", "kv_idx < window", *args]) == 2
    assert word in capsys.readouterr().err


def test_explain_prints_the_stages_and_the_blocks(capsys):
    assert main(["explain", "--score", "score + slope[h] * (kv_idx - q_idx)", "--mask", "q_idx >= kv_idx",
                 "--q-len", "1024"]) == 0
    out = capsys.readouterr().out
    for word in ("parsed", "simplified", "lse shift", "native lowering", "block sparsity", "backend auto"):
        assert word in out


def test_explain_png(tmp_path, capsys):
    png = tmp_path / "mask.png"
    assert main(["explain", "--mask", "q_idx >= kv_idx", "--q-len", "4096", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_png_needs_the_masks_tensors(tmp_path, capsys):
    png = tmp_path / "doc.png"
    assert main(["explain", "--mask", "doc[q_idx] == doc[kv_idx]", "--q-len", "256", "--png", str(png)]) == 2
    assert "--tensor doc=FILE" in capsys.readouterr().err
    doc = tmp_path / "doc.pt"
    torch.save(torch.repeat_interleave(torch.arange(4), 64), doc)
    assert main(["explain", "--mask", "doc[q_idx] == doc[kv_idx]", "--q-len", "256", "--png", str(png),
                 "--tensor", f"doc={doc}"]) == 0
    assert png.exists()


@pytest.mark.parametrize("mask", ["q_idx >= kv_idx", "kv_idx < prefix[b] | q_idx >= kv_idx", "h % 2 == kv_idx % 2"])
def test_allowed_fraction_is_exact(mask):
    tensors = {"prefix": torch.tensor([3, 40])} if "prefix" in mask else {}
    v = al.compile(mask=mask)
    b = torch.arange(2).view(2, 1, 1, 1)
    h = torch.arange(3).view(1, 3, 1, 1)
    q = torch.arange(45).view(1, 1, 45, 1)
    kv = torch.arange(50).view(1, 1, 1, 50)
    if "prefix" in mask:
        dense = (kv < tensors["prefix"][b]) | (q >= kv)
    elif "h" in mask:
        dense = h % 2 == kv % 2
    else:
        dense = q >= kv
    want = float(dense.expand(2, 3, 45, 50).double().mean())
    assert allowed_fraction(v, 45, 50, 2, 3, **tensors) == pytest.approx(want, abs=1e-12)


def test_demo_error_is_relative_to_the_output_scale(capsys):
    """An unnormalized variant's outputs sum over many keys (hundreds here): float16 rounding of such values is
    ~5e-2 absolute, which the demo must not call a mismatch; its error column is relative to the largest |value|."""
    assert main(["demo", "--dtype", "float16", "--only", "activation"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_demo_runs_and_python_dash_m(capsys):
    assert main(["demo", "--seq-len", "130", "--only", "causal", "--only", "document"]) == 0
    out = capsys.readouterr().out
    assert "causal" in out and "document" in out and "0 failed" in out
    done = subprocess.run([sys.executable, "-m", "attnlang", "check", "--mask", "q_idx >="],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "^" in done.stderr
