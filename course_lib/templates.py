"""Cloze templates: "[X] was born in [Y] ." split into the pieces a model adapter tokenizes.

A template is kept as text around two slots, the subject [X] and the blank [Y]. Adapters
tokenize each piece on its own so that the prompt's own tokens (the ones soft prompts tune) are
the same for every subject; that only works if the whitespace before a slot travels with the slot,
which is what ``pieces`` arranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SUBJECT = "[X]"
BLANK = "[Y]"

Slot = Literal["text", "subject", "blank"]


class TemplateError(ValueError):
    """A template that cannot be used as a cloze prompt; the message names the template and where it came from."""


@dataclass(frozen=True)
class Template:
    """One cloze prompt. ``source`` says where it came from (file and line) for error messages."""

    text: str
    weight: float | None = None
    source: str = "<string>"

    def __post_init__(self) -> None:
        validate(self.text, self.source)

    @property
    def subject_first(self) -> bool:
        return self.text.index(SUBJECT) < self.text.index(BLANK)

    @property
    def blank_has_left_context(self) -> bool:
        """Whether anything precedes the blank: a causal LM cannot predict a blank at the very start."""
        return bool(self.text[: self.text.index(BLANK)].strip())

    def pieces(self) -> list[tuple[Slot, str]]:
        """The template as (kind, text) pieces, whitespace before a slot moved onto the slot.

        "[X] was born in [Y] ." -> [("subject", ""), ("text", " was born in"), ("blank", " "),
        ("text", " .")]. The slot's text is the whitespace that precedes it, so adapters know
        whether the subject or answer is a word-initial token (" Paris" vs "Paris").
        """
        out: list[tuple[Slot, str]] = []
        rest = self.text
        while rest:
            i_x, i_y = rest.find(SUBJECT), rest.find(BLANK)
            hits = [(i, s) for i, s in ((i_x, SUBJECT), (i_y, BLANK)) if i >= 0]
            if not hits:
                out.append(("text", rest))
                break
            i, slot = min(hits)
            before = rest[:i]
            stripped = before.rstrip()
            if stripped:
                out.append(("text", stripped))
            out.append(("subject" if slot == SUBJECT else "blank", before[len(stripped):]))
            rest = rest[i + len(slot):]
        return out

    def fill(self, subject: str, obj: str | None = None) -> str:
        """The sentence with the subject in, and the object too if given (else [Y] stays)."""
        out = self.text.replace(SUBJECT, subject)
        return out if obj is None else out.replace(BLANK, obj)


def validate(text: object, source: str = "<string>") -> None:
    """Raise TemplateError unless ``text`` is a string with exactly one [X] and one [Y]."""
    if not isinstance(text, str):
        raise TemplateError(f"{source}: template must be a string, got {type(text).__name__}: {text!r}")
    for slot in (SUBJECT, BLANK):
        n = text.count(slot)
        if n != 1:
            what = "has no" if n == 0 else f"has {n}"
            raise TemplateError(
                f"{source}: template {text!r} {what} {slot} slot; a cloze template needs exactly one "
                f"{SUBJECT} (the subject) and one {BLANK} (the blank)"
            )
