"""What an item's text is made of: the catalogue fields the text tower reads."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

# Which catalogue fields an item's text-tower input is made of, joined by ". ".
# A trained model must be fed the text it was trained on; the rule model reads
# everything, category words included, since text is all it has.
CONTENT_TEXT_FIELDS = ("title", "category", "description")
TRAINED_TEXT_FIELDS = ("title",)  # training data carries titles only


def compose_text(fields: Sequence[str], values: Mapping[str, object]) -> str:
    """The text-tower input of one item: its non-empty ``fields`` in order, joined by ". "."""
    return ". ".join(str(values[f]) for f in fields if values.get(f))
