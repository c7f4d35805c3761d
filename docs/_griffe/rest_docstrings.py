"""Render amorsize's reST-flavoured docstrings as Markdown for the API reference.

The docstrings are written for ``help()`` and doctest: ``>>>`` examples, ``Text::``
literal blocks and ``:class:`Name``` roles. Markdown would read ``>>>`` as nested block
quotes and a doctest's ``[1, 2]`` output as a reference link, so this griffe extension
(loaded by ``mkdocs.yml``) rewrites each docstring before it is rendered: examples and
literal blocks become fenced code, roles become code spans. The source is left unchanged.

>>> print(to_markdown("See :class:`Task`. Data flow::\\n\\n    a -> b"))
See `Task`. Data flow:
<BLANKLINE>
```text
a -> b
```
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :class:`Name`, :meth:`~pkg.Class.name`, :func:`!name` ...
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):`[~!]?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, deeper_than: int | None) -> int:
    """Where the block from ``start`` ends: at a blank line (``deeper_than=None``: a doctest),
    or at the first non-blank line indented ``deeper_than`` or less (a literal block)."""
    end = start
    while end < len(lines):
        line = lines[end]
        if deeper_than is None and not line.strip():
            break
        if deeper_than is not None and line.strip() and _indent(line) <= deeper_than:
            break
        end += 1
    while end > start and not lines[end - 1].strip():  # trailing blank lines stay outside
        end -= 1
    return end


def _fence(block: list[str], lang: str, pad: str) -> list[str]:
    cut = min((_indent(b) for b in block if b.strip()), default=0)
    return [f"{pad}```{lang}", *(pad + b[cut:] for b in block), f"{pad}```"]


def to_markdown(text: str) -> str:
    """The docstring ``text`` with doctests and literal blocks fenced and roles as code."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        pad = line[: _indent(line)]
        if line.lstrip().startswith(">>>"):
            end = _block_end(lines, i, None)
            out += _fence(lines[i:end], "pycon", pad)
            i = end
            continue
        out.append(_ROLE.sub(r"`\1`", line))
        i += 1
        if not line.rstrip().endswith("::"):
            continue
        # A reST literal block: `Text::` reads `Text:`, the indented lines below are code.
        out[-1] = out[-1].rstrip()[:-1]
        if not out[-1].strip():
            out.pop()
        start = i
        while start < len(lines) and not lines[start].strip():
            start += 1
        if start < len(lines) and _indent(lines[start]) > _indent(line):
            end = _block_end(lines, start, _indent(line))
            out += ["", *_fence(lines[start:end], "text", pad)]
            i = end
    return "\n".join(out)


class RestDocstrings(griffe.Extension):
    """Rewrite every docstring griffe loads with `to_markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called once per loaded object, before anything is rendered."""
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
