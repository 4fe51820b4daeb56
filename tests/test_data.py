"""course_lib.data: facts, relations and prompt sets as published, and clear errors for bad data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from course_lib import data
from course_lib import download as dl
from course_lib.data import (
    DataError,
    Fact,
    data_path,
    data_root,
    load_facts,
    load_prompts,
    relation_info,
    relations,
)


@pytest.fixture
def shared(shared, monkeypatch) -> Path:
    """Read the shared data folder in place, with no download mirror from the developer's environment."""
    monkeypatch.delenv(dl.URL_BASE_ENV, raising=False)
    return shared


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def non_empty_lines(path: Path) -> int:
    """How the shared README says to count facts: many files have no trailing newline."""
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# --------------------------------------------------------------------------------------------
# the published data, counted


TREX_COLUMNS = {
    "trex_original": ("orig_train", "orig_dev", "orig_test(=LAMA)"),
    "trex_extend": ("ext_train", "ext_dev", "ext_test"),
    "trex_distinct": ("distinct_train", "distinct_dev", "distinct_test"),
}


@pytest.mark.parametrize("dataset", list(TREX_COLUMNS))
def test_trex_fact_counts_match_the_published_table(shared, dataset):
    rows = [r for r in read_tsv(shared / "counts_trex.tsv") if r["relation"] != "TOTAL"]
    assert relations(dataset) == sorted(r["relation"] for r in rows)
    assert len(rows) == 41
    wrong = {}
    for r in rows:
        for split, column in zip(data.SPLITS, TREX_COLUMNS[dataset]):
            got = len(load_facts(dataset, r["relation"], split))
            if got != int(r[column]):
                wrong[(r["relation"], split)] = (got, int(r[column]))
    assert wrong == {}


def test_trex_totals_match_the_readme(shared):
    totals = {
        "trex_original": (29_029, 7_255, 34_039),
        "trex_extend": (21_771, 7_255, 7_266),
        "trex_distinct": (27_574, 3_513, 2_952),
    }
    for dataset, expected in totals.items():
        got = tuple(sum(len(load_facts(dataset, r, s)) for r in relations(dataset)) for s in data.SPLITS)
        assert got == expected, dataset


@pytest.mark.parametrize("dataset, n_relations", [("google_re", 3), ("conceptnet", 16)])
def test_google_re_and_conceptnet_counts(shared, dataset, n_relations):
    rows = [r for r in read_tsv(shared / "counts_googlere_conceptnet.tsv") if r["dataset"] == dataset]
    assert len(rows) == n_relations
    assert relations(dataset) == sorted(r["relation"] for r in rows)
    got = {r["relation"]: tuple(len(load_facts(dataset, r["relation"], s)) for s in data.SPLITS) for r in rows}
    expected = {r["relation"]: tuple(int(r[s]) for s in data.SPLITS) for r in rows}
    assert got == expected


def test_facts_are_read_line_by_line(shared):
    path = shared / "soft_prompts/db/trex_original/P19/test.jsonl"
    facts = load_facts("trex_original", "P19", "test")
    assert len(facts) == non_empty_lines(path)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert facts[0] == Fact(first["sub"], first["obj"])
    assert all(isinstance(f.subject, str) and isinstance(f.object, str) and f.subject and f.object for f in facts)


def test_lpaqa_prompt_counts_and_lama_templates(shared):
    rows = [r for r in read_tsv(shared / "counts_trex.tsv") if r["relation"] != "TOTAL"]
    wrong = {}
    for r in rows:
        rel = r["relation"]
        got = (
            len(load_prompts("lpaqa-mine", "trex_original", rel)),
            len(load_prompts("lpaqa-paraphrase", "trex_original", rel)),
            [t.text for t in load_prompts("lama", "trex_original", rel)],
            relation_info("trex_original", rel).template,
        )
        expected = (int(r["lpaqa_mine_prompts"]), int(r["lpaqa_para_prompts"]), [r["lama_manual_template"]],
                    r["lama_manual_template"])
        if got != expected:
            wrong[rel] = (got, expected)
    assert wrong == {}
    total = next(r for r in read_tsv(shared / "counts_trex.tsv") if r["relation"] == "TOTAL")
    assert (int(total["lpaqa_mine_prompts"]), int(total["lpaqa_para_prompts"])) == (1166, 1073)


def test_google_re_and_conceptnet_prompt_counts(shared):
    count = lambda ps, ds: sum(len(load_prompts(ps, ds, r)) for r in relations(ds))  # noqa: E731
    assert [count(ps, "google_re") for ps in ("lama", "lpaqa-mine", "lpaqa-paraphrase")] == [3, 98, 84]
    assert count("lama", "conceptnet") == 149


def test_relation_info(shared):
    p19 = relation_info("trex_original", "P19")
    assert (p19.id, p19.label, p19.type, p19.template) == ("P19", "place of birth", "N-1", "[X] was born in [Y] .")
    assert relation_info("trex_distinct", "P19") == p19
    born = relation_info("google_re", "place_of_birth")
    assert (born.label, born.type) == ("place of birth", None)
    assert born.template == load_prompts("lama", "google_re", "place_of_birth")[0].text
    assert "[X]" in born.template and "[Y]" in born.template
    assert relation_info("conceptnet", "AtLocation").template == "You are likely to find a [X] in a [Y]."


@pytest.mark.parametrize("dataset", ["trex_original", "trex_extend", "trex_distinct"])
def test_every_trex_prompt_set_loads(shared, dataset):
    found = {ps: load_prompts(ps, dataset, "P19") for ps in data.PROMPT_SETS}
    assert [t.text for t in found["lama"]] == ["[X] was born in [Y] ."]
    assert found["lama"][0].weight is None
    for ps in ("lpaqa-mine", "lpaqa-paraphrase"):
        assert len(found[ps]) > 5
        assert all(isinstance(t.weight, float) and t.weight > 0 for t in found[ps])
        assert found[ps][0].source.endswith("P19.jsonl:1")
    assert found["lpaqa-mine"][0].text == "[X] was born in [Y] ."
    assert found["lpaqa-mine"][0].weight == pytest.approx(0.003614419372752309)
    manual = found["lpaqa-manual"]
    assert manual[0].text == "[X] was born in [Y] ." and manual[1].text == "[X] was born in [Y]."
    assert all(t.weight is None for t in manual)
    assert len(manual) == non_empty_lines(shared / "lpaqa/prompt/manual_paraphrase/P19.txt")
    for model in ("bert", "roberta"):
        (trigger,) = found[f"autoprompt-{model}"]
        assert trigger.weight is None and f"fact_retrieval_{model}_prompts.jsonl:" in trigger.source
        assert trigger.text != "[X] was born in [Y] ."
    assert found["autoprompt-bert"][0].text != found["autoprompt-roberta"][0].text


def test_autoprompt_template_is_the_relations_line(shared):
    (t,) = load_prompts("autoprompt-bert", "trex_original", "P1001")
    assert t.text == "[X]vik nationwide disabilities policing within [Y]."
    assert t.source.endswith("fact_retrieval_bert_prompts.jsonl:1")


def test_google_re_and_conceptnet_prompt_sets(shared):
    for ps in ("lama", "lpaqa-mine", "lpaqa-paraphrase"):
        assert load_prompts(ps, "google_re", "date_of_birth")
    concept = load_prompts("lama", "conceptnet", "AtLocation")
    assert len(concept) > 1 and concept[0].text == "You are likely to find a [X] in a [Y]."
    with pytest.raises(DataError, match="no ConceptNet templates"):
        load_prompts("lpaqa-mine", "conceptnet", "AtLocation")
    for ps in ("autoprompt-bert", "lpaqa-manual"):
        with pytest.raises(DataError, match="T-REx relations only"):
            load_prompts(ps, "google_re", "place_of_birth")


# --------------------------------------------------------------------------------------------
# bad requests


def valid_list(msg: str) -> list[str]:
    assert "Valid: " in msg
    return msg.split("Valid: ", 1)[1].split(", ")


def test_unknown_dataset(shared):
    with pytest.raises(DataError) as info:
        load_facts("trex", "P19", "test")
    msg = str(info.value)
    assert "unknown dataset 'trex'" in msg
    assert valid_list(msg) == list(data.DATASETS)
    with pytest.raises(DataError, match="unknown dataset 'googlere'.*Did you mean google_re"):
        relations("googlere")
    with pytest.raises(DataError, match="unknown dataset"):
        load_prompts("lama", "lama", "P19")


def test_unknown_relation(shared):
    with pytest.raises(DataError) as info:
        load_facts("trex_original", "P999", "test")
    msg = str(info.value)
    assert "unknown relation 'P999' for dataset 'trex_original'" in msg
    assert valid_list(msg) == relations("trex_original")
    for ps in data.PROMPT_SETS:
        with pytest.raises(DataError, match="unknown relation 'P999'.*Valid: P1001, P101"):
            load_prompts(ps, "trex_original", "P999")
    with pytest.raises(DataError, match="unknown relation 'place_of_brith'.*Did you mean place_of_birth"):
        relation_info("google_re", "place_of_brith")
    # a relation of another dataset
    with pytest.raises(DataError, match="unknown relation 'P19' for dataset 'conceptnet'"):
        load_facts("conceptnet", "P19", "train")


def test_unknown_split(shared):
    with pytest.raises(DataError) as info:
        load_facts("trex_original", "P19", "valid")
    assert "unknown split 'valid'" in str(info.value)
    assert valid_list(str(info.value)) == ["train", "dev", "test"]


def test_unknown_prompt_set(shared):
    with pytest.raises(DataError) as info:
        load_prompts("lpaqa", "trex_original", "P19")
    msg = str(info.value)
    assert "unknown prompt set 'lpaqa'" in msg
    assert valid_list(msg) == list(data.PROMPT_SETS)


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_data_env_must_name_a_folder(monkeypatch, tmp_path, kind):
    target = tmp_path / "data.zip"
    if kind == "file":
        target.write_text("not a folder")
    monkeypatch.setenv(data.ENV_VAR, str(target))
    with pytest.raises(DataError) as info:
        load_facts("trex_original", "P19", "test")
    msg = str(info.value)
    assert f"COURSE_LIB_DATA={str(target)!r} is not a folder" in msg
    with pytest.raises(DataError, match="is not a folder"):
        data_root()


# --------------------------------------------------------------------------------------------
# malformed files, in a small fake data folder

P19 = '{"relation": "P19", "template": "[X] was born in [Y] .", "label": "place of birth", "type": "N-1"}\n'


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """A tiny data folder with one relation, P19, laid out like shared/data."""
    root = tmp_path / "data"
    db = root / "soft_prompts/db/trex_original/P19"
    db.mkdir(parents=True)
    for split in data.SPLITS:
        (db / f"{split}.jsonl").write_text('{"sub": "Dante", "obj": "Florence"}\n{"sub": "Goethe", "obj": "Frankfurt"}')
    prompts = root / "soft_prompts/prompts"
    (prompts / "trex").mkdir(parents=True)
    (prompts / "trex" / "P19.jsonl").write_text('{"template": "[X] was born in [Y] ."}\n')
    (prompts / "trex_mine").mkdir()
    (prompts / "trex_mine" / "P19.jsonl").write_text(
        '{"template": "[X] was born in [Y] .", "weight": 0.75}\n{"template": "[Y] native [X] .", "weight": 0.25}\n'
    )
    (root / "lama").mkdir()
    (root / "lama/relations.jsonl").write_text(P19)
    monkeypatch.setenv(data.ENV_VAR, str(root))
    return root


def facts_file(root: Path, split: str = "test") -> Path:
    return root / f"soft_prompts/db/trex_original/P19/{split}.jsonl"


def test_fake_folder_reads(fake):
    assert relations("trex_original") == ["P19"]
    assert load_facts("trex_original", "P19", "dev") == [Fact("Dante", "Florence"), Fact("Goethe", "Frankfurt")]
    assert [(t.text, t.weight) for t in load_prompts("lpaqa-mine", "trex_original", "P19")] == [
        ("[X] was born in [Y] .", 0.75), ("[Y] native [X] .", 0.25)
    ]
    assert relation_info("trex_original", "P19").label == "place of birth"
    with pytest.raises(DataError, match="no relations found for dataset 'google_re'"):
        relations("google_re")


def test_data_follows_the_env_var_within_a_session(fake, monkeypatch):
    """Pointing COURSE_LIB_DATA elsewhere mid-session must not serve the old folder's cached data."""
    assert relation_info("trex_original", "P19").label == "place of birth"
    other = fake.parent / "other"
    shutil.copytree(fake, other)
    (other / "lama/relations.jsonl").write_text(P19.replace("place of birth", "birthplace"))
    monkeypatch.setenv(data.ENV_VAR, str(other))
    assert relation_info("trex_original", "P19").label == "birthplace"


@pytest.mark.parametrize(
    "content, line, says",
    [
        ('{"sub": "Dante", "obj": "Florence"}\n{"sub": "Goethe", "obj": }\n', 2, "malformed JSON"),
        ('{"sub": "Dante", "obj": "Florence"}\n\n\n{"sub": "Goethe"', 4, "malformed JSON"),
        ('{"sub": "Dante", "obj": "Florence"}\n{"sub": "Goethe"}\n', 2, "missing key 'obj' (keys: sub)"),
        ('{"subject": "Dante", "obj": "Florence"}\n', 1, "missing key 'sub'"),
        ('{"sub": "Dante", "obj": 3}\n', 1, "'obj' must be a string, got int: 3"),
        ('{"sub": null, "obj": "Florence"}\n', 1, "'sub' must be a string, got NoneType"),
        ('{"sub": "Dante", "obj": "Florence"}\n["Goethe", "Frankfurt"]\n', 2, "expected a JSON object, got list"),
        ('"Dante"\n', 1, "expected a JSON object, got str"),
    ],
)
def test_malformed_fact_lines_name_file_and_line(fake, content, line, says):
    path = facts_file(fake)
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_facts("trex_original", "P19", "test")
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: ")
    assert says in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_facts_file(fake, content):
    path = facts_file(fake, "dev")
    path.write_text(content)
    with pytest.raises(DataError, match="no facts in this split") as info:
        load_facts("trex_original", "P19", "dev")
    assert str(path) in str(info.value)


def test_non_utf8_file(fake):
    path = facts_file(fake)
    path.write_bytes('{"sub": "Dante", "obj": "Firenze"}\n{"sub": "G\u00f6the", "obj": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as info:
        load_facts("trex_original", "P19", "test")
    assert str(path) in str(info.value)


def test_missing_split_file(fake):
    path = facts_file(fake, "train")
    path.unlink()
    with pytest.raises(DataError, match="does not exist") as info:
        load_facts("trex_original", "P19", "train")
    assert str(path) in str(info.value)


def test_bom_crlf_and_blank_lines_read_fine(fake):
    facts_file(fake).write_bytes(
        "\ufeff".encode() + b'{"sub": "Dante", "obj": "Florence"}\r\n\r\n{"sub": "G\xc3\xb6the", "obj": "Frankfurt"}\r\n'
    )
    assert load_facts("trex_original", "P19", "test") == [Fact("Dante", "Florence"), Fact("Göthe", "Frankfurt")]
    prompts = fake / "soft_prompts/prompts/trex/P19.jsonl"
    prompts.write_bytes(b'\xef\xbb\xbf{"template": "[X] was born in [Y] ."}\r\n')
    assert [t.text for t in load_prompts("lama", "trex_original", "P19")] == ["[X] was born in [Y] ."]
    (fake / "lama/relations.jsonl").write_bytes(b"\xef\xbb\xbf" + P19.replace("\n", "\r\n").encode())
    assert relation_info("trex_original", "P19").template == "[X] was born in [Y] ."


def test_bom_and_crlf_in_a_plain_text_prompt_file(fake):
    folder = fake / "lpaqa/prompt/manual_paraphrase"
    folder.mkdir(parents=True)
    (folder / "P19.txt").write_bytes(b"\xef\xbb\xbf[X] was born in [Y] .\r\n\r\n  [X] is from [Y] .  \r\n")
    got = load_prompts("lpaqa-manual", "trex_original", "P19")
    assert [t.text for t in got] == ["[X] was born in [Y] .", "[X] is from [Y] ."]
    assert got[1].source.endswith("P19.txt:3")


@pytest.mark.parametrize(
    "content, line, says",
    [
        ('{"template": "[X] was born in [Y] ."}\n{"template": "[X] was born in Florence ."}\n', 2, "has no [Y] slot"),
        ('{"template": "[X] was born in [Y] .", "weight": "high"}\n', 1, "'weight' must be a finite number, got 'high'"),
        ('{"template": ["[X]", "[Y]"]}\n', 1, "'template' must be a string, got list"),
        ('{"text": "[X] was born in [Y] ."}\n', 1, "missing key 'template'"),
    ],
)
def test_malformed_prompt_lines_name_file_and_line(fake, content, line, says):
    path = fake / "soft_prompts/prompts/trex_mine/P19.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_prompts("lpaqa-mine", "trex_original", "P19")
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: ")
    assert says in msg


def test_empty_prompt_file(fake):
    path = fake / "soft_prompts/prompts/trex/P19.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no templates") as info:
        load_prompts("lama", "trex_original", "P19")
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# without COURSE_LIB_DATA: download into the per-user cache


def test_downloads_into_the_cache_without_the_env_var(shared_dir, monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.delenv("COURSE_LIB_CACHE", raising=False)  # it would outrank XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(dl.URL_BASE_ENV, shared_dir.as_uri())
    root = tmp_path / "cache" / "course_lib" / "data"
    assert data_root() == root

    # listing relations needs no download: the registry knows the files
    assert relations("trex_original") == sorted(p.name for p in (shared_dir / "soft_prompts/db/trex_original").iterdir())
    assert relations("conceptnet") == sorted(p.name for p in (shared_dir / "soft_prompts/db/conceptnet").iterdir())
    assert not root.exists()

    facts = load_facts("trex_original", "P19", "test")
    rel = "soft_prompts/db/trex_original/P19/test.jsonl"
    assert (root / rel).read_bytes() == (shared_dir / rel).read_bytes()
    assert len(facts) == non_empty_lines(shared_dir / rel)
    assert data_path(rel) == root / rel

    assert relation_info("trex_original", "P19").label == "place of birth"
    assert (root / "lama/relations.jsonl").is_file()
    assert [t.text for t in load_prompts("autoprompt-roberta", "trex_original", "P19")] == [
        t.text for t in _shared_prompts(monkeypatch, shared_dir, "autoprompt-roberta")
    ]
    with pytest.raises(DataError, match="unknown relation 'P999'"):
        load_prompts("lama", "trex_original", "P999")
    downloaded = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert downloaded == [
        "autoprompt/prompts/fact_retrieval_roberta_prompts.jsonl",
        "lama/relations.jsonl",
        rel,
    ]


def _shared_prompts(monkeypatch, root: Path, prompt_set):
    with monkeypatch.context() as m:
        m.setenv(data.ENV_VAR, str(root))
        return load_prompts(prompt_set, "trex_original", "P19")
