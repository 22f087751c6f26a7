"""Text normalisation applied to every row before dedup and splitting.

Steps, in order: strip markup (HTML/XML tags such as ``<br />`` and comments
become a space), unescape HTML entities (``&amp;`` -> ``&``), Unicode NFC,
optional lowercasing, and whitespace collapsing (every run of whitespace,
newlines included, becomes one space; leading/trailing whitespace goes).

Tags are stripped *before* entities are unescaped, so an escaped ``&lt;b&gt;``
in a review survives as the literal text ``<b>``. Only things that look like
tags are removed (``<`` followed by a letter, ``/`` or ``!--``), so ``a < b``
and ``<3`` are kept.
"""

from __future__ import annotations

import html
import re
import unicodedata

_MARKUP = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>", re.DOTALL)


def normalize_text(text: str, *, strip_markup: bool = True, lowercase: bool = False) -> str:
    """Return the normalised form of `text` (possibly empty)."""
    if strip_markup:
        if "<" in text:
            text = _MARKUP.sub(" ", text)
        if "&" in text:
            text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    if lowercase:
        text = text.lower()
    return " ".join(text.split())
