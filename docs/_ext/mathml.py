"""Math rendered to MathML while the site is built.

Browsers display MathML Core natively, so the pages need no script and no font from
anywhere: the site builds and reads offline. A formula that cannot be converted is a
build warning (and so an error under ``-W``), never a silently raw formula.
"""
from __future__ import annotations

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.util import logging

logger = logging.getLogger(__name__)


# environments latex2mathml lays out as tables only under another name
_RENAMED = {"aligned": "align*", "gathered": "gather*"}


def _render(self, node, display: str) -> str:
    latex = node.astext()
    for old, new in _RENAMED.items():
        latex = latex.replace(f"\\begin{{{old}}}", f"\\begin{{{new}}}").replace(
            f"\\end{{{old}}}", f"\\end{{{new}}}")
    try:
        mathml = convert(latex, display=display)
    except Exception as exc:  # noqa: BLE001 - latex2mathml raises many kinds
        logger.warning("math not rendered (%s): %s", exc, latex, location=node)
        return f"<code>{self.encode(latex)}</code>"
    if "<mi>&</mi>" in mathml:  # an alignment the converter did not understand
        logger.warning("math not rendered (a bare '&' outside an alignment): %s", latex,
                       location=node)
    return mathml


def visit_inline(self, node) -> None:
    self.body.append(f'<span class="math">{_render(self, node, "inline")}</span>')
    raise nodes.SkipNode


def _displayed(latex: str, nowrap: bool) -> str:
    """The formula of a display block as Sphinx's MathJax output arranges it: equations
    separated by blank lines become the rows of one ``align*``; a single equation with an
    alignment ``&`` or row break is a ``split``."""
    if nowrap:
        return latex
    parts = [part.strip() for part in latex.split("\n\n") if part.strip()]
    if len(parts) > 1:
        return "\\begin{align*}" + " \\\\\n".join(parts) + "\\end{align*}"
    body = parts[0] if parts else ""
    if ("&" in body or "\\\\" in body) and "\\begin{" not in body:
        return "\\begin{split}" + body + "\\end{split}"
    return body


def visit_block(self, node) -> None:
    node_id = node["ids"][0] if node.get("ids") else None
    anchor = f' id="{node_id}"' if node_id else ""
    piece = nodes.math_block("", _displayed(node.astext(), bool(node.get("nowrap"))))
    piece.source, piece.line = node.source, node.line
    self.body.append(f'<div class="math"{anchor}>{_render(self, piece, "block")}</div>\n')
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathml", (visit_inline, None), (visit_block, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
