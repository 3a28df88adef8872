"""Sphinx configuration of the spherical-cl API docs."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "spherical-cl"
author = "spherical-cl developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
myst_heading_anchors = 3
html_theme = "alabaster"
suppress_warnings = ["myst.header"]
