"""The Jinja2 environments of the report's templates (``haven/report/templates``)."""

from __future__ import annotations

import functools
import html

import jinja2
from markupsafe import Markup


def _escape(value):
    """Every ``{{ value }}`` of the page through :func:`html.escape` (quotes as ``&quot;``/``&#x27;``),
    the escaping the page had before it became a template; markupsafe's own writes ``&#34;``/``&#39;``.
    Markup (a macro's output) is already HTML and passes as it is."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


def _md_cell(value) -> str:
    """A Markdown table cell: a ``|`` would end the cell, a newline the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


@functools.lru_cache(maxsize=None)
def environment(kind: str) -> jinja2.Environment:
    """``"html"``: autoescaped (a project name or a config value can hold ``<`` or ``&``);
    ``"md"``: Markdown, written as it is, block tags on their own lines (trim_blocks)."""
    loader = jinja2.PackageLoader("haven.report", "templates")
    # keep_trailing_newline: both files end in a newline, as they did before
    if kind == "html":
        return jinja2.Environment(loader=loader, autoescape=True, finalize=_escape, keep_trailing_newline=True,
                                  undefined=jinja2.StrictUndefined)
    env = jinja2.Environment(loader=loader, autoescape=False, trim_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md_cell"] = _md_cell
    return env


def render(template: str, **context) -> str:
    kind = "html" if template.endswith(".html.j2") else "md"
    return environment(kind).get_template(template).render(**context)
