"""Sphinx configuration: ``python -m sphinx -W -b html docs docs/_build/html``.

Pages: the markdown files of ``docs/`` (MyST), plus three generated here
before Sphinx reads the sources (into ``docs/_generated/``, not committed):

* ``api.rst``: one autosummary table per public module, listing its
  ``__all__`` (so a name added to ``__all__`` gets its page without an edit
  here); numpydoc renders the docstrings;
* ``capabilities.md``: the capability table, from
  ``smoothmax._dispatch.CAPABILITIES`` (the registry the dispatcher and the
  tests read);
* the gallery (sphinx-gallery, ``docs/gallery/`` -> ``docs/auto_examples/``):
  one page per example of ``examples/``, showing the committed results of
  ``examples/results/`` (the examples themselves take minutes to hours; the
  gallery scripts only read their outputs).

Intersphinx works offline: each inventory is looked up on the project's site
first and, when that fails (no network), in ``docs/_inv/`` (small fallback
inventories of the names our docstrings cite, written by
``docs/_inv/make_fallback.py``), so the build neither fails nor warns.
"""
import importlib
import inspect
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(DOCS, "gallery"))  # the gallery scripts import _results

import smoothmax  # noqa: E402
from smoothmax._dispatch import CAPABILITIES  # noqa: E402

project = "smoothmax"
author = "the smoothmax authors"
copyright = "2026, the smoothmax authors"
release = version = smoothmax.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inv", "gallery", "sg_execution_times.rst", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip", "auto_examples/*.md5",
                    "auto_examples/*.json", "auto_examples/sg_execution_times.rst"]
templates_path = ["_templates"]
html_theme = "alabaster"
html_title = f"smoothmax {release}"
html_theme_options = {"description": "differentiable dynamic programming", "fixed_sidebar": True}
html_sidebars = {"**": ["about.html", "searchbox.html", "navigation.html"]}

# MyST: $...$ and $$...$$ math (MathJax), heading anchors for links between pages
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# numpydoc renders the docstrings; autosummary writes one page per public name
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
autosummary_generate = True
autosummary_imported_members = True
autodoc_inherit_docstrings = False  # no docstrings of torch.autograd.Function / nn.Module methods
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"  # the numpydoc sections say the types; signatures stay short
add_module_names = False

intersphinx_timeout = 5


def _inventory(name, url):
    return (url, (None, os.path.join(DOCS, "_inv", f"{name}.inv")))


intersphinx_mapping = {
    "python": _inventory("python", "https://docs.python.org/3/"),
    "numpy": _inventory("numpy", "https://numpy.org/doc/stable/"),
    "torch": _inventory("torch", "https://docs.pytorch.org/docs/stable/"),
    "jax": _inventory("jax", "https://docs.jax.dev/en/latest/"),
}

sphinx_gallery_conf = {
    "examples_dirs": "gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"_results\.py",
    "write_computation_times": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "show_signature": False,
}

# ------------------------------------------------------------ generated pages

GENERATED = os.path.join(DOCS, "_generated")
# the public modules; a framework module that cannot be imported here is left out
# (said on the page) rather than failing the build
PUBLIC = ["smoothmax", "smoothmax.losses", "smoothmax.attention", "smoothmax.crf", "smoothmax.torch",
          "smoothmax.jax"]


def _write(name, text):
    os.makedirs(GENERATED, exist_ok=True)
    path = os.path.join(GENERATED, name)
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:  # unchanged files keep their time stamp: no needless rebuild
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def api_page():
    lines = ["API reference", "=============", "",
             "Every public name, from its docstring. The mathematics the docstrings cite as",
             "``docs/spec.md §N`` is on :doc:`../spec`.", ""]
    for modname in PUBLIC:
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            lines += [modname, "-" * len(modname), "", f"Not importable where these pages were built: {exc}.", ""]
            continue
        names = [n for n in mod.__all__ if not inspect.ismodule(getattr(mod, n))]
        lines += [modname, "-" * len(modname), "", f".. automodule:: {modname}", "   :no-members:", "",
                  f".. currentmodule:: {modname}", "", ".. autosummary::", "   :toctree: generated", ""]
        lines += [f"   {n}" for n in names] + [""]
    return "\n".join(lines)


def capability_page():
    order = {0: "none (values, and explicit `*_grad` / `*_hvp` calls)", 1: "first order",
             2: "second order (grad of grad, HVP)"}
    lines = ["# Capabilities", "",
             "Generated from `smoothmax._dispatch.CAPABILITIES`, the registry the dispatcher and the "
             "test fixtures read. Every backend gets the value, the expected path `E` (`*_grad`) and "
             "the Hessian-vector product (`*_hvp`) as functions; the last column says how many orders "
             "of differentiation the framework's own autodiff gets through the custom passes.", "",
             "| backend | device | engine | dtypes | autodiff in the framework |", "|---|---|---|---|---|"]
    for (backend, device), cap in CAPABILITIES.items():
        lines.append(f"| {backend} | {device} | {cap.get('engine', '?')} | {', '.join(cap.get('dtypes', ()))} "
                     f"| {order.get(cap.get('autodiff'), cap.get('autodiff'))} |")
    extra = sorted({k for cap in CAPABILITIES.values() for k in cap} - {"engine", "dtypes", "autodiff"})
    if extra:
        lines += ["", f"Other registry fields: {', '.join(extra)}."]
    return "\n".join(lines) + "\n"


_write("api.rst", api_page())
_write("capabilities.md", capability_page())
