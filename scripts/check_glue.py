"""Fail when an executed notebook's text names a glue key that none of its cells glued.

Sphinx reports a missing key only when it builds the site, and the site is built from the default
model's run alone; the runs on the other families (scripts/test_families.sh) are checked with this.

    python scripts/check_glue.py _build/executed-tiny-bert/book/*.ipynb
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)")

def missing_keys(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    wanted = {m.group(1).strip() for c in nb["cells"] if c["cell_type"] == "markdown"
              for m in ROLE.finditer("".join(c["source"]))}
    glued = {out["metadata"]["scrapbook"]["name"] for c in nb["cells"] for out in c.get("outputs", [])
             if "name" in out.get("metadata", {}).get("scrapbook", {})}
    return sorted(k for k in wanted if k not in glued and "::" not in k)


def main(paths: list[str]) -> int:
    bad = 0
    for p in paths:
        keys = missing_keys(Path(p))
        if keys:
            bad += 1
            print(f"{p}: text names glue keys no cell glued: {', '.join(keys)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
