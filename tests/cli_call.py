"""Calling the command line in-process, for the CLI test modules (``from cli_call import call``).

A plain module rather than conftest.py: tests/site has a conftest of its own, and two modules named
``conftest`` cannot both be imported by name in one pytest session.
"""

from __future__ import annotations

import pytest

from course_lib.cli import main


def call(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one CLI command (argparse's errors exit; the rest return)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err

