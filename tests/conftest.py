"""Shared pytest configuration for tests/."""

from __future__ import annotations


def pytest_configure(config):
    # tests/test_exercises.py: execute every exercise and solution notebook with papermill (minutes;
    # run as their own phase with `pytest -m notebooks`, after the book build has warmed the results cache).
    config.addinivalue_line(
        "markers", "notebooks: execute the exercise and solution notebooks with papermill (slow; its own CI phase)"
    )
