#!/usr/bin/env python
"""Build ``course_lib/data_registry.json``: sha256, size and public download URL of every data file.

Usage::

    python scripts/make_data_registry.py [DATA_DIR] [--out PATH] [--archives DIR]

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

The registry also lists the data archives, one per public source (``ARCHIVES``), built
reproducibly by ``course_lib.archives.build`` from the files whose URL points into that source's
repository: ``"archives": {name: {"sha256", "size", "repo", "files"}}``. ``--archives DIR`` also
writes them into DIR, to be attached to the release (see .github/workflows/release-data.yml).
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

# Archive name -> the GitHub repository whose files it holds (course_lib.archives.archive_of).
ARCHIVES = {
    "soft-prompts.tar.gz": "hiaoxui/soft-prompts",
    "lpaqa.tar.gz": "jzbjyb/LPAQA",
    "autoprompt.tar.gz": "ucinlp/autoprompt",
    "optiprompt.tar.gz": "princeton-nlp/OptiPrompt",
    "pararel.tar.gz": "yanaiela/pararel",
}


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
    return {"version": 1, "archives": {name: {"repo": repo} for name, repo in ARCHIVES.items()}, "files": files}


def archive_members(registry: dict) -> dict[str, list[str]]:
    """Archive name -> the registry files whose URL points into its repository."""
    out: dict[str, list[str]] = {name: [] for name in registry["archives"]}
    by_repo = {a["repo"]: name for name, a in registry["archives"].items()}
    for rel, e in registry["files"].items():
        url = e.get("url") or ""
        if url.startswith(RAW + "/"):
            name = by_repo.get("/".join(url[len(RAW) + 1:].split("/")[:2]))
            if name:
                out[name].append(rel)
    return out


def add_archives(registry: dict, data_dir: Path, out_dir: Path | None) -> None:
    """Build each archive (in memory; into out_dir too if given) and record its sha256 and size."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's course_lib
    from course_lib.archives import build as build_archive

    for name, members in archive_members(registry).items():
        blob = build_archive(data_dir, members)
        registry["archives"][name].update(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), files=len(members))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(blob)


def differences(made: dict, packaged: dict) -> list[str]:
    """What a data folder gives that the packaged registry does not say (the archives, every file's entry).

    The project's own notes (files with no public URL) may be absent from the folder: a copy
    downloaded from the sources does not have them, and no archive holds them.
    """
    out = [f"archive {n}: {made['archives'].get(n)} != {a}" for n, a in packaged["archives"].items()
           if made["archives"].get(n) != a]
    for rel, entry in packaged["files"].items():
        if rel not in made["files"]:
            if entry.get("url"):
                out.append(f"{rel}: missing from the data folder")
        elif made["files"][rel] != entry:
            out.append(f"{rel}: {made['files'][rel]} != {entry}")
    out += [f"{rel}: not in the registry" for rel in made["files"] if rel not in packaged["files"]]
    return out


def write(registry: dict, out: Path) -> None:
    # One entry per line: small, and diffs stay readable.
    lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True, ensure_ascii=False)}"
             for k, v in registry["files"].items()]
    archives = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in registry["archives"].items()]
    text = ('{"version": %d, "archives": {\n' % registry["version"] + ",\n".join(archives) + "\n},\n"
            '"files": {\n' + ",\n".join(lines) + "\n}}\n")
    json.loads(text)  # sanity check
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", nargs="?", type=Path, default=None)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "course_lib" / "data_registry.json")
    ap.add_argument("--archives", type=Path, default=None,
                    help="also write the data archives into this folder (default: only record their sha256)")
    ap.add_argument("--check", action="store_true",
                    help="write no registry; exit 1 if the data folder gives another one (default: write it)")
    args = ap.parse_args(argv)
    data_dir = (args.data_dir or default_data_dir()).resolve()
    if not data_dir.is_dir():
        ap.error(f"{data_dir} is not a folder (give the data folder or set COURSE_LIB_DATA)")
    registry = build(data_dir)
    add_archives(registry, data_dir, args.archives)
    if args.check:
        problems = differences(registry, json.loads(args.out.read_text(encoding="utf-8")))
        for p in problems:
            print(f"differs: {p}")
        print(f"{args.out}: {'DIFFERS FROM' if problems else 'matches'} what {data_dir} gives"
              + (f"; archives written to {args.archives}" if args.archives else ""))
        return 1 if problems else 0
    write(registry, args.out)
    files = registry["files"].values()
    n_ver = sum(e["verified"] for e in files)
    n_url = sum(e["url"] is not None for e in files)
    print(f"{args.out}: {len(files)} files, {n_url} with URL ({n_ver} verified, "
          f"{sum('alt' in e for e in files)} with a verified alternative), "
          f"{args.out.stat().st_size:,} bytes; archives: "
          + ", ".join(f"{n} ({a['files']} files, {a['size']:,} bytes)" for n, a in registry["archives"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
