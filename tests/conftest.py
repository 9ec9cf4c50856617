"""Shared test settings: every test starts from a fixed seed and a known default dtype, and
plans with the built-in cost model whatever this machine has calibrated (the tests of the
model's lookup set the variable themselves)."""

import os

import pytest
import torch

os.environ["KCPRNN_COST_MODEL"] = "builtin"


@pytest.fixture(autouse=True)
def _seed_and_defaults():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
