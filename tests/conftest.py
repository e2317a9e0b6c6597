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
