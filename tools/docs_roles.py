"""A griffe extension for the documentation site (mkdocs.yml loads it): the
docstrings' Sphinx roles (``:class:`~x.Y```, ``:meth:`f```) become code spans,
as Markdown has no roles. ``~`` keeps the last dotted part, as in Sphinx."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|mod|attr|exc|data|obj):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    target = match[2].rsplit(".", 1)[-1] if match[1] else match[2]
    return f"`{target}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite roles in every docstring as the object is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
