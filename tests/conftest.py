"""One marker gates GPU tests: `gpu` tests run only where torch sees a CUDA device.

Hypothesis runs derandomized (profile "ci"): the same examples on every run, so a red run is reproducible and a
green one is not luck. ``HYPOTHESIS_PROFILE=explore`` searches afresh, with more examples, when hunting for bugs."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def needs_fa4():
    """Skips a module's tests unless FA4 runs here: a CUDA GPU of sm90 or newer and flash_attn.cute importable
    (``pytestmark = pytest.mark.usefixtures("needs_fa4")``)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from attnlang.backends import fa4
    try:
        fa4._flash()
    except Exception as e:
        pytest.skip(f"flash_attn.cute not importable: {e}")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FA4 needs sm90+")


def pytest_runtest_logreport(report):
    """With ATTNLANG_REPORT=path, each failure's traceback and each test's outcome and seconds are appended to that
    file as they happen: a GPU run that hits its time limit still leaves what it found."""
    path = os.environ.get("ATTNLANG_REPORT")
    if not path or (report.when != "call" and not report.failed):
        return
    with open(path, "a") as f:
        f.write(f"{report.outcome.upper()} {report.nodeid} {report.duration:.1f}s\n")
        if report.failed:
            text = report.longreprtext
            f.write((text if len(text) <= 24000 else text[:12000] + "\n[...]\n" + text[-12000:]) + "\n\n")
