"""course_lib.templates: splitting cloze templates into pieces, and refusing bad ones clearly."""

from __future__ import annotations

import pytest

from course_lib.templates import Template, TemplateError, validate


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "[X] was born in [Y] .",
            [("subject", ""), ("text", " was born in"), ("blank", " "), ("text", " .")],
        ),
        (
            "The native language of [X] is [Y] .",
            [("text", "The native language of"), ("subject", " "), ("text", " is"), ("blank", " "), ("text", " .")],
        ),
        # the blank before the subject
        (
            "[Y] is the capital of [X] .",
            [("blank", ""), ("text", " is the capital of"), ("subject", " "), ("text", " .")],
        ),
        # AutoPrompt: trigger text glued to the subject, the blank glued to the final period
        (
            "[X]vik nationwide disabilities policing within [Y].",
            [("subject", ""), ("text", "vik nationwide disabilities policing within"), ("blank", " "), ("text", ".")],
        ),
        # nothing after the blank, nothing between the slots
        ("[X] [Y]", [("subject", ""), ("blank", " ")]),
        ("[X][Y]", [("subject", ""), ("blank", "")]),
    ],
)
def test_pieces(text, expected):
    assert Template(text).pieces() == expected


def test_pieces_move_all_whitespace_before_a_slot_onto_the_slot():
    pieces = Template("  [X]\tlived in \n [Y]  !").pieces()
    assert pieces == [("subject", "  "), ("text", "\tlived in"), ("blank", " \n "), ("text", "  !")]


@pytest.mark.parametrize(
    "text",
    [
        "[X] was born in [Y] .",
        "The native language of [X] is [Y] .",
        "[Y] is the capital of [X] .",
        "[X]vik nationwide disabilities policing within [Y].",
        "  [X]\tlived in \n [Y]  !",
    ],
)
def test_pieces_rebuild_the_template(text):
    """No character is lost or invented: joining the pieces, slots back in, gives the text again."""
    slot = {"subject": "[X]", "blank": "[Y]", "text": ""}
    assert "".join(piece + slot[kind] for kind, piece in Template(text).pieces()) == text


def test_slot_order_and_left_context():
    assert Template("[X] was born in [Y] .").subject_first
    assert not Template("[Y] is the capital of [X] .").subject_first
    assert Template("[X] was born in [Y] .").blank_has_left_context
    assert not Template("[Y] is the capital of [X] .").blank_has_left_context
    assert not Template("  [Y] is the capital of [X] .").blank_has_left_context
    assert Template("The capital of [X] is [Y] .").blank_has_left_context


def test_fill():
    t = Template("[X] was born in [Y] .")
    assert t.fill("Dante") == "Dante was born in [Y] ."
    assert t.fill("Dante", "Florence") == "Dante was born in Florence ."


def test_weight_and_source_are_kept():
    t = Template("[X] is [Y] .", weight=0.25, source="prompts/P1.jsonl:3")
    assert (t.weight, t.source) == (0.25, "prompts/P1.jsonl:3")


@pytest.mark.parametrize(
    "text, says",
    [
        ("[X] was born in Florence .", "has no [Y]"),
        ("Dante was born in [Y] .", "has no [X]"),
        ("[X] was born in [Y] or [Y] .", "has 2 [Y]"),
        ("[X] and [X] are [Y] .", "has 2 [X]"),
        ("", "has no [X]"),
    ],
)
def test_bad_templates_name_their_source(text, says):
    with pytest.raises(TemplateError) as info:
        Template(text, source="prompts/P19.jsonl:7")
    msg = str(info.value)
    assert msg.startswith("prompts/P19.jsonl:7: ")
    assert says in msg and repr(text) in msg


@pytest.mark.parametrize("value, type_name", [(None, "NoneType"), (42, "int"), (["[X]", "[Y]"], "list")])
def test_non_string_template(value, type_name):
    with pytest.raises(TemplateError, match=rf"^lama/relations.jsonl:2: template must be a string, got {type_name}"):
        validate(value, "lama/relations.jsonl:2")
    with pytest.raises(TemplateError, match="must be a string"):
        Template(value)  # type: ignore[arg-type]


def test_template_error_is_a_value_error():
    with pytest.raises(ValueError):
        Template("no slots at all")
