"""Griffe extension for the documentation site (named in mkdocs.yml).

segkit's docstrings are Google style with a few reStructuredText habits that Markdown would garble:

* doctests under ``Example:`` (STYLE.md); Griffe's Google parser knows only the plural ``Examples:``
  and would render them as prose, so the heading is read as the plural;
* Sphinx roles (``:class:`Registry```, ``:func:`~segkit.ops.masks.paste_masks_in_image```) become
  code spans of the name.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`~?([^`]+)`")


def markdown_docstring(text: str) -> str:
    """``text`` with ``Example:`` headings made plural and Sphinx roles made code spans."""
    return _ROLE.sub(r"`\1`", _EXAMPLE_HEADING.sub(r"\1Examples:", text))


class SegkitDocstrings(griffe.Extension):
    """Rewrite every docstring with :func:`markdown_docstring` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
