"""Tests of course_lib.download: checksummed, atomic downloads (file:// and a local http server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from course_lib import download as dl
from course_lib.download import ChecksumMismatch, DataNotFound, fetch_all, fetch_file, load_registry

# Small files from different sources, one with a dotted/deep path.
SMALL = [
    "soft_prompts/prompts/trex/P17.jsonl",
    "lpaqa/prompt/manual_paraphrase/P101.txt",
    "autoprompt/prompts/fact_retrieval_bert_prompts.jsonl",
    "soft_prompts/db/google_re/date_of_birth/dev.jsonl",
]
REL = SMALL[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> list[Path]:
    """Every file (temporary ones included) under root."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(autouse=True)
def _no_url_base(monkeypatch):
    monkeypatch.delenv(dl.URL_BASE_ENV, raising=False)


@pytest.fixture
def mirror(tmp_path, shared_dir) -> Path:
    """A private copy of a few shared files, served through file:// URLs."""
    root = tmp_path / "mirror"
    for rel in SMALL:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_dir / rel, root / rel)
    return root


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "dest"


# --------------------------------------------------------------------------------------------
# the packaged registry


def test_registry_is_well_formed_and_small():
    path = Path(dl.__file__).with_name(dl.REGISTRY_FILE)
    assert path.stat().st_size < 2_000_000
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["version"] == 1
    reg = load_registry()
    assert reg == raw["files"] and len(reg) > 700
    for rel, e in reg.items():
        assert not rel.startswith("/") and ".." not in rel.split("/") and "\\" not in rel
        assert len(e["sha256"]) == 64 and int(e["sha256"], 16) >= 0
        assert isinstance(e["size"], int) and e["size"] >= 0
        assert isinstance(e["verified"], bool)
        assert e["url"] is None or e["url"].startswith("https://")
        assert not (e["verified"] and e["url"] is None)
        for alt in e.get("alt", []):
            assert alt.startswith("https://") and alt != e["url"]
    # every file that is not the project's own has some public URL
    assert {k for k, e in reg.items() if not e["url"]} == {
        "README.md", "counts_trex.tsv", "counts_googlere_conceptnet.tsv"}


def test_load_registry_returns_a_copy():
    reg = load_registry()
    reg[REL]["sha256"] = "0" * 64
    del reg[SMALL[1]]
    fresh = load_registry()
    assert fresh[REL]["sha256"] != "0" * 64 and SMALL[1] in fresh


def test_registry_covers_every_shared_file_with_correct_checksum(shared_dir):
    reg = load_registry()
    on_disk = {p.relative_to(shared_dir).as_posix(): p for p in shared_dir.rglob("*") if p.is_file()}
    assert sorted(set(on_disk) - set(reg)) == [], "files missing from the registry: rerun scripts/make_data_registry.py"
    assert sorted(set(reg) - set(on_disk)) == [], "registry lists files the shared folder lacks"
    bad = [rel for rel, p in on_disk.items() if p.stat().st_size != reg[rel]["size"] or sha(p) != reg[rel]["sha256"]]
    assert bad == []


# --------------------------------------------------------------------------------------------
# downloads that work


@pytest.mark.parametrize("rel", SMALL)
def test_download_via_url_base(monkeypatch, mirror, dest, rel, shared_dir):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    path = fetch_file(rel, dest, progress=False)
    assert path == dest / rel
    assert sha(path) == load_registry()[rel]["sha256"]
    assert path.read_bytes() == (shared_dir / rel).read_bytes()
    assert files_under(dest) == [path]  # no temporary file left behind


def test_download_from_the_shared_folder_itself(monkeypatch, dest, shared_dir):
    monkeypatch.setenv(dl.URL_BASE_ENV, shared_dir.as_uri() + "/")  # a trailing slash is fine
    path = fetch_file("lama/relations.jsonl", dest, progress=False)
    assert sha(path) == load_registry()["lama/relations.jsonl"]["sha256"]


def test_download_via_explicit_url(mirror, dest):
    path = fetch_file(REL, dest, url=(mirror / REL).as_uri(), progress=False)
    assert sha(path) == load_registry()[REL]["sha256"]


def test_explicit_url_wins_over_url_base(monkeypatch, mirror, dest, tmp_path):
    monkeypatch.setenv(dl.URL_BASE_ENV, (tmp_path / "nowhere").as_uri())
    path = fetch_file(REL, dest, url=(mirror / REL).as_uri(), progress=False)
    assert path.is_file()


def test_second_call_does_not_download_again(monkeypatch, mirror, dest):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    path = fetch_file(REL, dest, progress=False)
    old = 1_000_000_000 * 10**9  # 2001-09-09: any later write would show
    os.utime(path, ns=(old, old))
    (mirror / REL).unlink()  # a download now would fail
    again = fetch_file(REL, dest, progress=False)
    assert again == path and path.stat().st_mtime_ns == old


def test_falls_back_to_alt_url(mirror, dest, tmp_path):
    reg = load_registry()
    reg[REL]["url"] = (tmp_path / "gone" / "P17.jsonl").as_uri()
    reg[REL]["alt"] = [(mirror / REL).as_uri()]
    path = fetch_file(REL, dest, registry=reg, progress=False)
    assert sha(path) == reg[REL]["sha256"]


def test_relpath_spellings(monkeypatch, mirror, dest):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    assert fetch_file("./" + REL, dest, progress=False) == dest / REL
    assert fetch_file(REL.replace("/", "\\"), dest, progress=False) == dest / REL


# --------------------------------------------------------------------------------------------
# bad bytes are never kept


def test_wrong_registry_checksum_raises_and_keeps_nothing(monkeypatch, mirror, dest):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    reg = load_registry()
    wrong = "ab" * 32
    reg[REL]["sha256"] = wrong
    with pytest.raises(ChecksumMismatch) as info:
        fetch_file(REL, dest, registry=reg, progress=False)
    msg = str(info.value)
    url = mirror.as_uri() + "/" + REL
    assert REL in msg and url in msg and wrong in msg and sha(mirror / REL) in msg
    assert (info.value.relpath, info.value.url, info.value.expected) == (REL, url, wrong)
    assert files_under(dest) == []


def test_corrupted_source_raises_and_keeps_nothing(monkeypatch, mirror, dest):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    (mirror / REL).write_bytes(b'{"template": "[X] is evil [Y] ."}')
    with pytest.raises(ChecksumMismatch, match="P17.jsonl"):
        fetch_file(REL, dest, progress=False)
    assert not (dest / REL).exists()
    assert files_under(dest) == []


def test_corrupted_destination_is_replaced(monkeypatch, mirror, dest):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    target = dest / REL
    target.parent.mkdir(parents=True)
    target.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="does not match its sha256 in data_registry.json"):
        path = fetch_file(REL, dest, progress=False)
    assert sha(path) == load_registry()[REL]["sha256"]
    assert files_under(dest) == [target]


def test_same_size_corruption_is_detected(monkeypatch, mirror, dest):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    target = dest / REL
    target.parent.mkdir(parents=True)
    good = (mirror / REL).read_bytes()
    target.write_bytes(good.replace(b"located", b"LOCATED"))
    assert target.stat().st_size == len(good)
    with pytest.warns(RuntimeWarning, match="does not match its sha256 in data_registry.json"):
        assert fetch_file(REL, dest, progress=False).read_bytes() == good


def test_corrupted_destination_is_removed_when_no_good_copy(monkeypatch, mirror, dest):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    (mirror / REL).write_bytes(b"also bad")
    target = dest / REL
    target.parent.mkdir(parents=True)
    target.write_bytes(b"garbage")
    with pytest.raises(ChecksumMismatch), \
            pytest.warns(RuntimeWarning, match="does not match its sha256 in data_registry.json"):
        fetch_file(REL, dest, progress=False)
    assert files_under(dest) == []


# --------------------------------------------------------------------------------------------
# helpful errors


def test_unknown_relpath_suggests_close_matches(dest):
    with pytest.raises(ValueError) as info:
        fetch_file("soft_prompts/prompts/trex/P177.jsonl", dest)
    assert isinstance(info.value, KeyError)  # also catchable as a lookup error
    msg = str(info.value)
    assert "P177.jsonl" in msg and "soft_prompts/prompts/trex/P17.jsonl" in msg
    assert not dest.exists()


def test_unknown_file_name_suggested_by_name(dest):
    with pytest.raises(dl.UnknownDataFile, match="lama/relations.jsonl"):
        fetch_file("relations.jsonl", dest)


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "soft_prompts/../README.md", "", "lama/"])
def test_paths_outside_the_data_are_refused(dest, bad):
    with pytest.raises(ValueError):
        fetch_file(bad, dest)
    assert not dest.exists()


def test_unreachable_url_names_it_and_suggests_env(monkeypatch, dest, tmp_path):
    base = (tmp_path / "no-such-mirror").as_uri()
    monkeypatch.setenv(dl.URL_BASE_ENV, base)
    with pytest.raises(DataNotFound) as info:
        fetch_file(REL, dest, progress=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"{base}/{REL}" in msg and "COURSE_LIB_DATA" in msg
    assert files_under(dest) == []


def test_file_without_public_url(dest):
    with pytest.raises(DataNotFound, match="COURSE_LIB_DATA") as info:
        fetch_file("counts_trex.tsv", dest)
    assert "no download URL" in str(info.value)
    assert files_under(dest) == []


# --------------------------------------------------------------------------------------------
# fetch_all


def test_fetch_all_by_prefix(monkeypatch, dest, shared_dir):
    monkeypatch.setenv(dl.URL_BASE_ENV, shared_dir.as_uri())
    paths = fetch_all(dest, ["lpaqa/prompt/manual_paraphrase", "lama/relations.jsonl"], progress=True)
    assert len(paths) == 42
    reg = load_registry()
    assert all(sha(p) == reg[p.relative_to(dest).as_posix()]["sha256"] for p in paths)


def test_fetch_all_prefix_is_a_folder_not_a_string_prefix(dest):
    with pytest.raises(ValueError, match="no data file under"):
        fetch_all(dest, ["soft_prompts/prompts/trex/P1"])  # not P1001.jsonl, P101.jsonl, ...
    with pytest.raises(ValueError, match="soft_prompts/prompts/trex_mine"):
        fetch_all(dest, ["soft_prompts/prompts/trex_mien"])


def test_fetch_all_everything_skips_files_without_url(mirror, dest):
    full = load_registry()
    reg = {rel: dict(full[rel], url=(mirror / rel).as_uri()) for rel in SMALL}
    reg["README.md"] = full["README.md"]
    with pytest.warns(UserWarning, match="README.md"):
        paths = fetch_all(dest, registry=reg, progress=False)
    assert sorted(p.relative_to(dest).as_posix() for p in paths) == sorted(SMALL)


def test_cli(monkeypatch, mirror, dest, capsys):
    monkeypatch.setenv(dl.URL_BASE_ENV, mirror.as_uri())
    assert dl.main([str(dest), "lpaqa/prompt/manual_paraphrase/P101.txt", "-q"]) == 0
    assert (dest / SMALL[1]).is_file()
    assert dl.main([str(dest), "nothing/here", "-q"]) == 1
    assert "no data file under" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# http:// (a local server; no internet needed) and progress bars


@pytest.fixture
def http_base(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_download_with_progress_bar(http_base, dest, capsys):
    root, base = http_base
    blob = os.urandom(3 * 2**20 + 123)  # big enough to get a byte progress bar
    (root / "big").mkdir()
    (root / "big" / "blob.bin").write_bytes(blob)
    reg = {"big/blob.bin": {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob),
                            "url": f"{base}/big/blob.bin", "verified": True}}
    path = fetch_file("big/blob.bin", dest, registry=reg, progress=True)
    assert path.read_bytes() == blob
    assert "big/blob.bin" in capsys.readouterr().err  # tqdm's bar went to stderr


def test_http_404_is_data_not_found(http_base, monkeypatch, dest):
    _, base = http_base
    monkeypatch.setenv(dl.URL_BASE_ENV, base)
    with pytest.raises(DataNotFound, match="HTTP 404") as info:
        fetch_file(REL, dest, progress=False)
    assert f"{base}/{REL}" in str(info.value)
    assert files_under(dest) == []
