"""The data archives (course_lib.archives) and `python -m course_lib download`, offline.

The archives are rebuilt here from the shared data folder and served by a local HTTP server (or as
file:// URLs): never the internet. Checked: the rebuilt archives have exactly the sha256 the
registry records (so a release built from the data folder is what the library expects); one
archive per public source, covering every file that has a public URL; a file needed from the
cache brings its source's archive once (one request), later misses are served from the kept
archive (no request); a wrong archive, an altered or unknown member are refused and nothing of
them is kept; an unreachable archive falls back to single-file downloads; the `download` command
fetches every archive and a second run downloads nothing.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from course_lib import archives as ar
from course_lib import download as dl
from course_lib.download import ChecksumMismatch, load_registry

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COURSE_LIB_DATA") or ROOT.parent / "shared" / "data").expanduser()
REL = "soft_prompts/db/trex_original/P19/test.jsonl"  # in soft-prompts.tar.gz


def members() -> dict[str, list[str]]:
    reg = load_registry()
    out: dict[str, list[str]] = {name: [] for name in ar.archives()}
    for rel, entry in reg.items():
        name = ar.archive_of(rel, entry)
        if name:
            out[name].append(rel)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Every archive, rebuilt from the shared data folder."""
    if not SHARED.is_dir():
        pytest.skip(f"no shared data folder at {SHARED}")
    out = tmp_path_factory.mktemp("archives")
    for name, files in members().items():
        (out / name).write_bytes(ar.build(SHARED, files))
    return out


class _Counting(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def server(built):
    """(base URL, list of requested paths) for a local server over the rebuilt archives."""
    _Counting.hits = []
    handler = functools.partial(_Counting, directory=str(built))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Counting.hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.delenv(dl.URL_BASE_ENV, raising=False)
    monkeypatch.delenv("COURSE_LIB_DATA", raising=False)
    monkeypatch.setenv("COURSE_LIB_CACHE", str(tmp_path / "cache"))
    # Never the release on GitHub: a test that forgets to set a base fails here, not on the network.
    monkeypatch.setenv(ar.ARCHIVE_URL_ENV, (tmp_path / "no-archives-here").as_uri())


def test_one_archive_per_public_source_covers_every_file_with_a_url():
    table = ar.archives()
    assert len(table) == len({a["repo"] for a in table.values()}) >= 5
    by_archive = members()
    reg = load_registry()
    for name, files in by_archive.items():
        assert len(files) == table[name]["files"] > 0, name
    covered = {rel for files in by_archive.values() for rel in files}
    assert covered == {rel for rel, e in reg.items() if e["url"]}  # the project's own notes are not data


def test_rebuilt_archives_have_the_registered_checksums(built):
    for name, info in ar.archives().items():
        blob = (built / name).read_bytes()
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (info["size"], info["sha256"]), (
            f"{name}: rebuilding from the data folder gives other bytes than the registry records: "
            "run scripts/make_data_registry.py (and publish the new archives with the release)")
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            assert all(m.isfile() and m.mtime == 0 and m.uid == 0 for m in tar)


def test_archive_urls_default_to_the_release(monkeypatch):
    from course_lib import release

    monkeypatch.delenv(ar.ARCHIVE_URL_ENV)
    assert ar.archive_url("lpaqa.tar.gz") == f"{release.REPOSITORY}/releases/download/{release.TAG}/lpaqa.tar.gz"


def test_first_file_brings_its_archive_once(server, tmp_path, monkeypatch):
    base, hits = server
    monkeypatch.setenv(ar.ARCHIVE_URL_ENV, base)
    from course_lib import data

    root = data.data_root()
    assert root == tmp_path / "cache" / "data"
    facts = data.load_facts("trex_original", "P19", "test")
    assert facts and hits == ["/soft-prompts.tar.gz"]
    soft = [rel for rel in members()["soft-prompts.tar.gz"]]
    assert all((root / rel).is_file() for rel in soft)  # the whole source, unpacked once
    data.load_facts("trex_original", "P36", "dev")
    assert hits == ["/soft-prompts.tar.gz"]
    # a file deleted later comes back from the kept archive, with no request
    (root / REL).unlink()
    assert dl.fetch_file(REL, root) == root / REL
    assert hits == ["/soft-prompts.tar.gz"]
    assert hashlib.sha256((root / REL).read_bytes()).hexdigest() == load_registry()[REL]["sha256"]
    # another source: another archive
    data.load_prompts("lpaqa-manual", "trex_original", "P19")
    assert hits == ["/soft-prompts.tar.gz", "/lpaqa.tar.gz"]


def test_file_urls_work_too(built, tmp_path, monkeypatch):
    monkeypatch.setenv(ar.ARCHIVE_URL_ENV, built.as_uri())
    assert dl.fetch_file(REL, tmp_path / "d") == tmp_path / "d" / REL


def test_wrong_archive_is_refused_and_not_kept(built, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    blob = bytearray((built / "autoprompt.tar.gz").read_bytes())
    blob[-20] ^= 0xFF
    (bad / "autoprompt.tar.gz").write_bytes(bytes(blob))
    monkeypatch.setenv(ar.ARCHIVE_URL_ENV, bad.as_uri())
    with pytest.raises(ChecksumMismatch, match="autoprompt.tar.gz"):
        ar.fetch_archive("autoprompt.tar.gz", tmp_path / "d")
    assert not [p for p in (tmp_path / "d").rglob("*") if p.is_file()]


def _registry_with(name: str, blob: bytes, monkeypatch) -> None:
    table = ar.archives()
    table[name].update(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    monkeypatch.setattr(ar, "_table", lambda: table)


@pytest.mark.parametrize("kind", ["altered", "unknown", "traversal", "link"])
def test_bad_members_are_refused(kind, built, tmp_path, monkeypatch):
    """An archive with the right sha256 (say, a registry edited to match) still cannot plant files."""
    files = members()["autoprompt.tar.gz"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in files:
            data = (SHARED / rel).read_bytes()
            if kind == "altered" and rel == files[-1]:
                data += b"\n"
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        extra = {"unknown": "autoprompt/evil.py", "traversal": "../../evil.txt"}.get(kind)
        if extra:
            info = tarfile.TarInfo(extra)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        if kind == "link":
            info = tarfile.TarInfo("autoprompt/link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    blob = __import__("gzip").compress(buf.getvalue())
    src = tmp_path / "src"
    src.mkdir()
    (src / "autoprompt.tar.gz").write_bytes(blob)
    _registry_with("autoprompt.tar.gz", blob, monkeypatch)
    monkeypatch.setenv(ar.ARCHIVE_URL_ENV, src.as_uri())
    dest = tmp_path / "d"
    error = ChecksumMismatch if kind == "altered" else ar.BadArchive
    with pytest.raises(error):
        ar.unpack("autoprompt.tar.gz", dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "autoprompt" / "evil.py").exists()
    assert not (dest / "autoprompt" / "link").exists()
    assert not (dest / ".archives" / "autoprompt.tar.gz.unpacked").exists()


def test_unreachable_archive_falls_back_to_single_files(tmp_path, monkeypatch, shared_dir):
    """No archive to be had: a warning, then the file's own URL (here a file:// copy of upstream)."""
    reg = load_registry()
    reg[REL] = dict(reg[REL])
    upstream = reg[REL]["url"]
    copy = tmp_path / "upstream" / "P19-test.jsonl"
    copy.parent.mkdir()
    copy.write_bytes((shared_dir / REL).read_bytes())
    real_urls = dl._candidate_urls
    monkeypatch.setattr(dl, "_candidate_urls", lambda rel, entry, url: [copy.as_uri()] if rel == REL
                        else real_urls(rel, entry, url))
    assert upstream.startswith("https://raw.githubusercontent.com/hiaoxui/soft-prompts/")
    with pytest.warns(UserWarning, match="one by one"):
        path = dl.fetch_file(REL, tmp_path / "d", registry=reg)
    assert path.read_bytes() == copy.read_bytes()


def test_download_command_fetches_everything_once(server, tmp_path, monkeypatch):
    base, hits = server
    env = {"COURSE_LIB_CACHE": str(tmp_path / "cache"), ar.ARCHIVE_URL_ENV: base, "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "course_lib", "download", "--no-model", "-q"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    total = sum(a["files"] for a in ar.archives().values())
    assert f"{len(ar.archives())} archives, {total} files checked (sha256) and unpacked" in first.stdout
    assert sorted(hits) == sorted(f"/{n}" for n in ar.archives())
    root = tmp_path / "cache" / "data"
    reg = load_registry()
    for rel in [r for files in members().values() for r in files]:
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == reg[rel]["sha256"], rel
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert len(hits) == len(ar.archives())  # all kept and verified: nothing downloaded again
    help_text = subprocess.run([sys.executable, "-m", "course_lib", "download", "--help"], env=env,
                               capture_output=True, text=True, timeout=60).stdout
    assert "--no-model" in help_text and "offline" in help_text


def test_download_command_converts_the_model(monkeypatch, tmp_path, capsys):
    from course_lib import models, prefetch

    converted = []
    monkeypatch.setattr(models, "converted_gguf_model", lambda name: converted.append(name) or tmp_path / name)
    monkeypatch.setattr(ar, "fetch_all_archives", lambda dest, progress=True: [])
    args = prefetch.argparse.Namespace(dest=tmp_path / "d", no_model=False, quiet=True)
    assert prefetch.run(args) == 0
    assert converted == ["gemma-3-270m"] and "model: gemma-3-270m ready" in capsys.readouterr().out


def test_registry_json_lists_archives_before_files():
    raw = json.loads((ROOT / "course_lib" / "data_registry.json").read_text())
    assert list(raw) == ["version", "archives", "files"]
