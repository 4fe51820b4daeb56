"""Bad input, tried systematically (property-based): every failure is a specific error naming the
file and line or the argument, never a traceback from deep inside json, torch or pandas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch

from course_lib.data import DataError, read_facts, read_templates
from course_lib.evaluation import score_facts, score_facts_in_spaces
from course_lib.results import counts_of
from course_lib.models import load_model
from course_lib.templates import BLANK, SUBJECT, Template, TemplateError
from course_lib.data import Fact

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text that often contains the slot markers, brackets, unicode and whitespace.
pieces = st.one_of(
    st.sampled_from([SUBJECT, BLANK, "[X", "Y]", "[", "]", " ", "\t", "\n", "é", "日本", "\u200b", "[Z]"]),
    st.text(max_size=6),
)
template_texts = st.lists(pieces, max_size=8).map("".join)


@SETTINGS
@given(template_texts)
def test_any_text_is_a_template_or_a_template_error(text: str) -> None:
    valid = text.count(SUBJECT) == 1 and text.count(BLANK) == 1
    try:
        t = Template(text, source="prompts.jsonl:7")
    except TemplateError as err:
        assert not valid
        assert "prompts.jsonl:7" in str(err)
        assert (SUBJECT in str(err)) or (BLANK in str(err)) or "string" in str(err)
        return
    assert valid
    # The pieces put back together give the template again: nothing lost, nothing invented.
    rebuilt = "".join(text_ if kind == "text" else text_ + (SUBJECT if kind == "subject" else BLANK) for kind, text_ in t.pieces())
    assert rebuilt == text
    assert [k for k, _ in t.pieces()].count("subject") == 1
    assert [k for k, _ in t.pieces()].count("blank") == 1


@pytest.mark.parametrize("value", [None, 3, ["[X] [Y]"], {"t": 1}])
def test_non_string_template_is_refused(value) -> None:
    with pytest.raises(TemplateError, match="must be a string"):
        Template(value, source="a.jsonl:2")  # type: ignore[arg-type]


# One jsonl line: valid facts, broken JSON, wrong shapes, wrong types, blanks.
fact_lines = st.one_of(
    st.builds(lambda s, o: json.dumps({"sub": s, "obj": o}), st.text(max_size=5), st.text(max_size=5)),
    st.text(max_size=12).filter(lambda s: "\n" not in s and "\r" not in s),
    st.sampled_from(["", "   ", "{", "[]", "null", '{"sub": "a"}', '{"obj": "b"}', '{"sub": 1, "obj": "b"}',
                     '{"sub": "a", "obj": null}', '"just a string"', "\ufeff"]),
)


@SETTINGS
@given(lines=st.lists(fact_lines, max_size=6), bom=st.booleans(), crlf=st.booleans())
def test_any_jsonl_gives_facts_or_a_data_error_naming_file_and_line(tmp_path: Path, lines, bom: bool, crlf: bool) -> None:
    path = tmp_path / "train.jsonl"
    text = ("\r\n" if crlf else "\n").join(lines)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    try:
        facts = read_facts(path)
    except DataError as err:
        msg = str(err)
        assert str(path) in msg
        assert "empty" in msg or any(f":{n}:" in msg for n in range(1, len(lines) + 1))
        return
    expected = []
    for line in text.encode().decode("utf-8-sig").split("\n"):
        line = line.removesuffix("\r")
        if line.strip():
            rec = json.loads(line)
            expected.append(Fact(rec["sub"], rec["obj"]))
    assert facts == expected


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl"
    path.write_bytes(b'{"sub": "a", "obj": "\xff"}\n')
    with pytest.raises(DataError, match=r"dev\.jsonl: not UTF-8"):
        read_facts(path)


@SETTINGS
@given(lines=st.lists(st.one_of(template_texts, st.just("")), max_size=5))
def test_any_template_file_gives_templates_or_an_error_naming_the_line(tmp_path: Path, lines) -> None:
    path = tmp_path / "P19.txt"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines), encoding="utf-8")
    try:
        templates = read_templates(path)
    except DataError as err:
        assert str(path) in str(err)
        return
    assert all(t.text.count(SUBJECT) == 1 and t.text.count(BLANK) == 1 for t in templates)


@pytest.fixture(scope="module")
def bert():
    return load_model("tiny-bert")


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


@SETTINGS
@given(subject=st.text(max_size=30), obj=st.text(max_size=12))
def test_any_subject_and_object_are_scored_or_dropped_with_a_reason(bert, subject: str, obj: str) -> None:
    scored = score_facts(bert, [Template("[X] was born in [Y] .")], [Fact(subject, obj)])
    assert scored.kept + sum(scored.dropped.values()) == 1
    if scored.kept:
        assert 1 <= int(scored.ranks[0]) <= bert.vocab_size


@pytest.mark.parametrize("subject", ["", " ", "\u200b"])
def test_subject_that_tokenizes_to_nothing(gpt2, subject: str) -> None:
    scored = score_facts(gpt2, [Template("[X] was born in [Y] .")], [Fact(subject, "Paris")])
    assert scored.kept == 1 and int(scored.ranks[0]) >= 1


def test_relation_with_zero_usable_facts_reports_nan_not_a_crash(bert) -> None:
    facts = [Fact("Dante", "Kaliningrad"), Fact("Petrarch", "Kaliningradovsk")]
    scored = score_facts(bert, [Template("[X] was born in [Y] .")], facts)
    assert scored.kept == 0
    assert dict(scored.dropped) == {"object is not one token": 2}
    assert all(math.isnan(v) for v in scored.metrics().values())


def test_subject_longer_than_the_context_is_cut_and_counted(gpt2) -> None:
    long_subject = "Dante " * 5000
    batch = gpt2.build_batch([gpt2.encode_prompt(Template("[X] was born in [Y] ."))], [long_subject, "Dante"])
    assert batch.extras["truncated"].tolist() == [True, False]
    assert batch.input_ids.shape[1] <= gpt2.model.config.n_positions
    assert gpt2.blank_logits(batch).shape == (2, gpt2.vocab_size)


def test_truncated_subjects_are_counted_per_answer_space_and_still_scored(gpt2) -> None:
    born = Template("[X] was born in [Y] .")
    facts = [Fact("Dante " * 5000, "Paris"), Fact("Dante", "Berlin"), Fact("Goethe", "Paris")]
    small = torch.zeros(gpt2.vocab_size, dtype=torch.bool)
    small[gpt2.answer_id("Berlin", born)] = True  # the long subject's object is outside this space
    scored = score_facts_in_spaces(gpt2, [born], facts, {"full": None, "small": small})
    full = scored["full"]
    assert full.kept == 3 and full.truncated == 1
    assert all(1 <= int(r) <= gpt2.vocab_size for r in full.ranks)
    assert scored["small"].kept == 1 and scored["small"].truncated == 0
    assert counts_of(full, len(facts))["truncated"] == 1
    assert counts_of(scored["small"], len(facts))["truncated"] == 0


def test_a_subject_cut_under_one_prompt_of_a_mixture_counts_once(gpt2) -> None:
    templates = [Template("[X] was born in [Y] ."), Template("[X] , who was born in the city of [Y] .")]
    scored = score_facts(gpt2, templates, [Fact("Dante " * 5000, "Paris"), Fact("Dante", "Paris")])
    assert scored.kept == 2 and scored.truncated == 1


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "true", "false", '"0.5"', "[0.5]"])
def test_a_template_weight_that_is_not_a_finite_number_names_file_and_line(tmp_path: Path, weight: str) -> None:
    path = tmp_path / "P19.jsonl"
    path.write_text('{"template": "[X] was born in [Y] .", "weight": 0.5}\n'
                    f'{{"template": "[X] is from [Y] .", "weight": {weight}}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"P19\.jsonl:2: 'weight' must be a finite number"):
        read_templates(path)


@pytest.mark.parametrize("name", ["P19.txt", "P19.jsonl"])
def test_a_template_file_that_is_not_utf8_names_file_and_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    lines = ["[X] was born in [Y] .", "[X] is from [Y] ."]
    if name.endswith(".jsonl"):
        lines = [json.dumps({"template": t}) for t in lines]
    path.write_bytes(lines[0].encode() + b"\n" + lines[1].encode().replace(b"from", b"fr\xe9m") + b"\n")
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: not UTF-8 text .*line 2\)"):
        read_templates(path)
