"""Shared pytest configuration and fixtures for tests/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = (
    Path(os.environ["COURSE_LIB_DATA"]).expanduser()
    if os.environ.get("COURSE_LIB_DATA")
    else Path(__file__).resolve().parents[2] / "shared" / "data"
)


def pytest_configure(config):
    # tests/test_exercises.py: execute every exercise and solution notebook with papermill (minutes;
    # run as their own phase with `pytest -m notebooks`, after the book build has warmed the results cache).
    config.addinivalue_line(
        "markers", "notebooks: execute the exercise and solution notebooks with papermill (slow; its own CI phase)"
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy shared machine extra threads only spin.

    Module-scoped and opt-in (``pytestmark = pytest.mark.usefixtures("one_thread")``): some tests
    set their own thread count, and the previous count is restored once the module is done.
    """
    import torch  # here, not at the top: conftest loads for every test, most of which never touch torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_dir() -> Path:
    """The shared data folder, without pointing course_lib at it (for tests that must not)."""
    if not SHARED.is_dir():
        pytest.skip(f"no shared data folder at {SHARED}")
    return SHARED


@pytest.fixture
def shared(shared_dir, monkeypatch) -> Path:
    """Read the shared data folder in place."""
    from course_lib import data  # here too: the site checks (tests/site) may run without course_lib

    monkeypatch.setenv(data.ENV_VAR, str(shared_dir))
    return shared_dir
