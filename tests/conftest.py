"""Test setup: 8 fake CPU devices so multi-device code runs everywhere."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The offline corpora in ../shared/data (present for developers and CI)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"expected the offline data folder at {SHARED_DATA}")
    return SHARED_DATA
