"""scripts/check_glue.py: glue keys named in the text but glued by no cell are found."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_glue.py"
spec = importlib.util.spec_from_file_location("check_glue", SCRIPT)
check_glue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_glue)


def notebook(tmp_path: Path, text: str, glued: list[str]) -> Path:
    outputs = [{"output_type": "display_data", "data": {"application/papermill.record/text/plain": "1"},
                "metadata": {"scrapbook": {"name": k, "mime_prefix": "application/papermill.record/"}}}
               for k in glued]
    nb = {"cells": [{"cell_type": "markdown", "source": [text], "metadata": {}},
                    {"cell_type": "code", "source": ["glue(...)"], "outputs": outputs, "metadata": {}}]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_a_key_the_text_names_but_no_cell_glued_is_reported(tmp_path: Path) -> None:
    path = notebook(tmp_path, "P@1 is {glue:text}`p1:.3f` on {glue:text}`kept` facts, {glue}`fig`.", ["p1", "fig"])
    assert check_glue.missing_keys(path) == ["kept"]
    assert check_glue.main([str(path)]) == 1


def test_every_key_glued_passes(tmp_path: Path) -> None:
    path = notebook(tmp_path, "P@1 is {glue:text}`p1:.3f` on {glue:text}`kept` facts.", ["p1", "kept"])
    assert check_glue.missing_keys(path) == [] and check_glue.main([str(path)]) == 0
