"""Shared test settings: every test starts from a fixed seed and a known default dtype."""

import pytest
import torch


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
