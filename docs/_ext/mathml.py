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


def visit_block(self, node) -> None:
    latex = node.astext()
    node_id = node["ids"][0] if node.get("ids") else None
    anchor = f' id="{node_id}"' if node_id else ""
    self.body.append(f'<div class="math"{anchor}>')
    # a block may hold several equations separated by blank lines (Sphinx's convention)
    for part in (latex.split("\n\n") if not node.get("nowrap") else [latex]):
        if part.strip():
            if "&" in part or "\\\\" in part:  # aligned rows, as Sphinx's MathJax output
                part = "\\begin{split}" + part + "\\end{split}"
            piece = nodes.math_block(part, part)
            piece.source, piece.line = node.source, node.line
            self.body.append(_render(self, piece, "block"))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathml", (visit_inline, None), (visit_block, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
