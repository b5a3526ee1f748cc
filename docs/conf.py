"""Sphinx configuration of the treessm site: ``make docs`` builds it into ``docs/_build``."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository's treessm, as the tests import it
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE))

import treessm  # noqa: E402
from figures import build_figures  # noqa: E402

# the photograph's tree and the plots of benchmarks/results/*.json, drawn on every build so
# that they never drift from the tables (docs/_generated, not kept in git)
build_figures()

project = "treessm"
author = "treessm contributors"
copyright = "treessm contributors, MIT licence"
version = release = treessm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "mathml",  # math rendered at build time: no script, nothing fetched
    "api_reference",  # docs/api/*.rst from the public modules' __all__
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "_generated", "Thumbs.db", ".DS_Store"]
html_math_renderer = "mathml"

# docstrings: Google style with PyG's sections
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shapes"]
napoleon_use_rtype = False
napoleon_use_ivar = True  # Attributes: as fields (a NamedTuple's fields are documented once)
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_inherit_docstrings = False
autodoc_default_options = {"exclude-members": "__init__, __new__"}

# Markdown pages: dollar math, tables, heading anchors
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = f"treessm {release}"
html_static_path = []  # docs/_static holds images the pages link, not theme files
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
    "navbar_align": "left",
    "header_links_before_dropdown": 6,
}
html_show_sourcelink = False
html_sidebars = {"*": []}  # a guide is one page: no section sidebar (the API pages keep theirs)
