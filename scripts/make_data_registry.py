#!/usr/bin/env python
"""Build ``course_lib/data_registry.json``: sha256, size and public download URL of every data file.

Usage::

    python scripts/make_data_registry.py [DATA_DIR] [--out PATH]

DATA_DIR defaults to ``$COURSE_LIB_DATA`` or else ``<repo>/../shared/data``. Every file under it
gets an entry keyed by its path relative to DATA_DIR (forward slashes)::

    {"sha256": ..., "size": N, "url": ... or null, "verified": bool,
     "alt": [...]   # optional: other public URLs serving the same bytes (verified ones only)
     "note": ...}   # optional: why a file has no URL, or where else it is published

``url`` comes from the mapping table below (local folder prefix -> upstream raw URL prefix).
``verified`` is true where the upstream path was seen in a public index of the upstream
repository (its file listing), false where the path is our best guess. The index stores each
distinct file only once, so byte-identical copies (e.g. soft-prompts' trex_mine/ = LPAQA's
mine/) are missing from it; for those, ``alt`` lists the verified URL of an identical file.
The checksum, not the URL, is what guarantees a download is the right file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

RAW = "https://raw.githubusercontent.com"

# Local prefix -> upstream URL prefix. A prefix ending in "/" maps a folder (the rest of the
# path is appended); otherwise it maps one file. First match wins, so list specific ones first.
# Default branches, as seen in links to each repository: LPAQA master, autoprompt master,
# OptiPrompt main, pararel main. For hiaoxui/soft-prompts no link naming its branch was found,
# so its URLs use "HEAD", which raw.githubusercontent.com resolves to the default branch.
MAPPINGS: list[tuple[str, str]] = [
    ("soft_prompts/", f"{RAW}/hiaoxui/soft-prompts/HEAD/"),
    ("lpaqa/prompt/", f"{RAW}/jzbjyb/LPAQA/master/prompt/"),
    ("autoprompt/prompts/", f"{RAW}/ucinlp/autoprompt/master/prompts/"),
    ("common_vocab/", f"{RAW}/princeton-nlp/OptiPrompt/main/common_vocabs/"),
    ("optiprompt_relation_metainfo/", f"{RAW}/princeton-nlp/OptiPrompt/main/relation_metainfo/"),
    ("pararel/trex_lms_vocab/", f"{RAW}/yanaiela/pararel/main/data/trex_lms_vocab/"),
    # LAMA publishes relations.jsonl only inside its data.zip; OptiPrompt ships the same bytes.
    ("lama/relations.jsonl", f"{RAW}/princeton-nlp/OptiPrompt/main/relation_metainfo/LAMA_relations.jsonl"),
]

# Local paths (or folder prefixes ending in "/") whose upstream path was NOT seen in the index.
# Everything else matched by MAPPINGS was seen (listings checked folder by folder).
NOT_SEEN: list[str] = [
    "soft_prompts/prompts/trex_mine/",  # identical to LPAQA prompt/mine/
    "soft_prompts/prompts/trex_paraphrase/",  # identical to LPAQA prompt/paraphrase/
    "soft_prompts/prompts/trex/P131.jsonl",  # P131, P276, P30: same bytes as trex/P17.jsonl
    "soft_prompts/prompts/trex/P276.jsonl",
    "soft_prompts/prompts/trex/P30.jsonl",
    "soft_prompts/prompts/trex/P20.jsonl",  # same bytes as google_re/place_of_death.jsonl
    "soft_prompts/prompts/google_re/place_of_birth.jsonl",  # same bytes as trex/P19.jsonl
    "soft_prompts/prompts/google_re_mine/place_of_birth.jsonl",
    "soft_prompts/prompts/google_re_mine/place_of_death.jsonl",
    "soft_prompts/prompts/google_re_paraphrase/place_of_birth.jsonl",
    "soft_prompts/prompts/google_re_paraphrase/place_of_death.jsonl",
    "lpaqa/prompt/manual_paraphrase/P131.txt",  # P131, P17, P276: same bytes as P30.txt
    "lpaqa/prompt/manual_paraphrase/P17.txt",
    "lpaqa/prompt/manual_paraphrase/P276.txt",
    "optiprompt_relation_metainfo/LAMA_relations.jsonl",
    "lama/relations.jsonl",
]

# Files with no upstream copy at all (written for this project), and extra notes.
PROJECT_MADE = {"README.md", "counts_trex.tsv", "counts_googlere_conceptnet.tsv"}
NOTES = {
    "lama/relations.jsonl": (
        "LAMA publishes this file only inside https://dl.fbaipublicfiles.com/LAMA/data.zip "
        "(member data/relations.jsonl); url is OptiPrompt's byte-identical LAMA_relations.jsonl"
    ),
}
PROJECT_NOTE = "written for this project; not published upstream (copy it from shared/data)"


def default_data_dir() -> Path:
    env = os.environ.get("COURSE_LIB_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upstream_url(relpath: str) -> str | None:
    for prefix, url in MAPPINGS:
        if prefix.endswith("/"):
            if relpath.startswith(prefix):
                return url + relpath[len(prefix):]
        elif relpath == prefix:
            return url
    return None


def seen_in_index(relpath: str) -> bool:
    return not any(relpath == p or (p.endswith("/") and relpath.startswith(p)) for p in NOT_SEEN)


def build(data_dir: Path) -> dict:
    files: dict[str, dict] = {}
    unmapped: list[str] = []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(data_dir).as_posix()
        url = upstream_url(rel)
        entry: dict = {"sha256": sha256_file(path), "size": path.stat().st_size, "url": url,
                       "verified": url is not None and seen_in_index(rel)}
        if rel in NOTES:
            entry["note"] = NOTES[rel]
        elif url is None:
            entry["note"] = PROJECT_NOTE if rel in PROJECT_MADE else "no upstream mapping known"
            if rel not in PROJECT_MADE:
                unmapped.append(rel)
        files[rel] = entry

    # Unverified files: offer the verified URLs of byte-identical files as fallbacks.
    verified_by_hash: dict[str, list[str]] = {}
    for rel, e in files.items():
        if e["verified"]:
            verified_by_hash.setdefault(e["sha256"], []).append(e["url"])
    for rel, e in files.items():
        if not e["verified"]:
            alts = sorted(set(verified_by_hash.get(e["sha256"], [])) - {e["url"]})
            if alts:
                e["alt"] = alts
    for rel in unmapped:
        print(f"warning: no upstream URL known for {rel}", file=sys.stderr)
    return {"version": 1, "files": files}


def write(registry: dict, out: Path) -> None:
    # One entry per line: small, and diffs stay readable.
    lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True, ensure_ascii=False)}"
             for k, v in registry["files"].items()]
    text = '{"version": %d, "files": {\n' % registry["version"] + ",\n".join(lines) + "\n}}\n"
    json.loads(text)  # sanity check
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", nargs="?", type=Path, default=None)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "course_lib" / "data_registry.json")
    args = ap.parse_args(argv)
    data_dir = (args.data_dir or default_data_dir()).resolve()
    if not data_dir.is_dir():
        ap.error(f"{data_dir} is not a folder (give the data folder or set COURSE_LIB_DATA)")
    registry = build(data_dir)
    write(registry, args.out)
    files = registry["files"].values()
    n_ver = sum(e["verified"] for e in files)
    n_url = sum(e["url"] is not None for e in files)
    print(f"{args.out}: {len(files)} files, {n_url} with URL ({n_ver} verified, "
          f"{sum('alt' in e for e in files)} with a verified alternative), "
          f"{args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
