"""Build the documentation site: ``python docs/build.py`` -> ``docs/_build/index.html``.

One command, minimal dependencies: the pages are the markdown files of
``docs/`` (rendered with the ``markdown`` package when it is installed, else
with the small converter below), plus three generated pages:

* ``api.html``: the API reference, from the docstrings and signatures of every
  public name (``smoothmax.__all__`` and the framework modules), via ``inspect``;
* ``capabilities.html``: the capability table, generated from
  ``smoothmax._dispatch.CAPABILITIES`` (the registry the tests read too);
* ``gallery.html``: the figures (PNG) and tables (markdown) that the examples
  wrote to ``examples/results/``.

Set ``SMOOTHMAX_DOCS_PLAIN=1`` to use the built-in converter even when
``markdown`` is installed. Options: ``--out DIR`` (default ``docs/_build``), ``--no-framework`` (skip
importing ``smoothmax.torch`` / ``smoothmax.jax`` for their reference).
"""
import argparse
import glob
import html
import importlib
import inspect
import os
import re
import shutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
RESULTS = os.path.join(REPO, "examples", "results")
sys.path.insert(0, REPO)

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 0; color: #222; line-height: 1.5; }
nav { background: #1f3b57; padding: .6em 1.5em; }
nav a { color: #fff; margin-right: 1.2em; text-decoration: none; font-weight: 500; }
main { max-width: 1000px; margin: 1.5em auto; padding: 0 1.5em; }
pre { background: #f5f6f8; padding: .8em; overflow-x: auto; border-radius: 4px; }
code { background: #f5f6f8; padding: 0 .2em; border-radius: 3px; }
pre code { background: none; padding: 0; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccd; padding: .25em .6em; }
th { background: #eef1f5; }
.api { border-top: 1px solid #dde; padding-top: .6em; margin-top: 1.4em; }
.sig { font-family: monospace; font-size: 1.02em; background: #eef4fb; padding: .3em .5em; display: block; }
.gallery img { max-width: 100%; border: 1px solid #dde; margin: .5em 0; }
.muted { color: #777; font-size: .9em; }
"""


# ---------------------------------------------------------------- markdown

def _inline(text):
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", text)
    text = re.sub(r"(?<![\w_])_([^_\s][^_]*)_(?![\w_])", r"<em>\1</em>", text)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
    return text


def _plain_markdown(text):
    """A small markdown subset: headings, fenced code, tables, lists, paragraphs, inline marks."""
    out, para, lines, i = [], [], text.splitlines(), 0

    def flush():
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            code = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                code.append(lines[i])
                i += 1
            out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
        elif re.match(r"^#{1,6} ", line):
            flush()
            level = len(line) - len(line.lstrip("#"))
            title = line[level:].strip()
            anchor = re.sub(r"[^\w]+", "-", title.lower()).strip("-")
            out.append(f'<h{level} id="{anchor}">{_inline(title)}</h{level}>')
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            flush()
            header = [c.strip() for c in line.strip().strip("|").split("|")]
            aligns = ["right" if c.strip().endswith(":") else "left"
                      for c in lines[i + 1].strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            t = ["<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>"]
            for r in rows:
                t.append("<tr>" + "".join(f'<td style="text-align:{aligns[k] if k < len(aligns) else "left"}">'
                                          f"{_inline(c)}</td>" for k, c in enumerate(r)) + "</tr>")
            out.append("".join(t) + "</table>")
            continue
        elif re.match(r"^\s*([-*]|\d+\.) ", line):
            flush()
            ordered = bool(re.match(r"^\s*\d+\.", line))
            items = []
            while i < len(lines) and (re.match(r"^\s*([-*]|\d+\.) ", lines[i])
                                      or (lines[i].startswith("  ") and items)):
                if re.match(r"^\s*([-*]|\d+\.) ", lines[i]):
                    items.append(re.sub(r"^\s*([-*]|\d+\.) ", "", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + f"</{tag}>")
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def render_markdown(text):
    if os.environ.get("SMOOTHMAX_DOCS_PLAIN"):
        return _plain_markdown(text)
    try:
        import markdown
    except ImportError:
        return _plain_markdown(text)
    return markdown.markdown(text, extensions=["tables", "fenced_code", "toc"])


# ---------------------------------------------------------------- pages

def page(title, body, nav):
    links = "".join(f'<a href="{href}">{html.escape(name)}</a>' for name, href in nav)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} — smoothmax"
            f"</title><style>{CSS}</style></head><body><nav>{links}</nav><main>{body}</main></body></html>")


def _doc_html(obj):
    doc = inspect.getdoc(obj) or "(no docstring)"
    return "<pre>" + html.escape(doc) + "</pre>"


def _signature(name, obj):
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def api_section(module_name, names=None):
    """Reference of the public names of one module: signature and docstring, classes with methods."""
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:  # a framework not installed: say so instead of failing the build
        return f"<h2>{module_name}</h2><p class='muted'>not importable here: {html.escape(str(exc))}</p>", []
    names = names if names is not None else getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")])
    parts = [f'<h2 id="{module_name}">{module_name}</h2>', _doc_html(mod)]
    toc = []
    for name in names:
        obj = getattr(mod, name, None)
        if obj is None:
            continue
        anchor = f"{module_name}.{name}"
        toc.append(anchor)
        if inspect.ismodule(obj):
            parts.append(f'<div class="api" id="{anchor}"><span class="sig">{anchor} (module)</span>'
                         f"<p>See <a href='#{obj.__name__}'>{obj.__name__}</a>.</p></div>")
            continue
        parts.append(f'<div class="api" id="{anchor}"><span class="sig">{html.escape(_signature(anchor, obj))}'
                     f"</span>{_doc_html(obj)}")
        if inspect.isclass(obj):
            for meth_name, meth in inspect.getmembers(obj, inspect.isfunction):
                if meth_name.startswith("_") and meth_name != "__init__":
                    continue
                if meth.__qualname__.split(".")[0] != obj.__name__:
                    continue
                parts.append(f"<p><code>{html.escape(_signature(meth_name, meth))}</code></p>"
                             + (_doc_html(meth) if inspect.getdoc(meth) else ""))
        parts.append("</div>")
    return "\n".join(parts), toc


def api_page(frameworks=True):
    import smoothmax

    modules = ["smoothmax"]
    for sub in ("losses", "attention", "crf"):
        if importlib.util.find_spec(f"smoothmax.{sub}") is not None:
            modules.append(f"smoothmax.{sub}")
    if frameworks:
        modules += ["smoothmax.torch", "smoothmax.jax"]
    body, tocs = [], []
    for m in modules:
        names = None
        if m == "smoothmax":
            names = [n for n in smoothmax.__all__ if not inspect.ismodule(getattr(smoothmax, n, None))]
        section, toc = api_section(m, names)
        body.append(section)
        tocs.append((m, toc))
    index = ["<h1>API reference</h1>", f"<p class='muted'>smoothmax {smoothmax.__version__}; generated "
             "from the docstrings by <code>docs/build.py</code>.</p>"]
    for m, toc in tocs:
        index.append(f"<p><strong><a href='#{m}'>{m}</a></strong>: "
                     + ", ".join(f"<a href='#{a}'>{a.rsplit('.', 1)[1]}</a>" for a in toc) + "</p>")
    return "\n".join(index + body)


def capability_table():
    """Markdown of the capability registry ``smoothmax._dispatch.CAPABILITIES``."""
    from smoothmax._dispatch import CAPABILITIES

    order_name = {0: "— (values and explicit grad/HVP functions)", 1: "first order", 2: "second order (grad of grad, HVP)"}
    lines = ["| backend | device | engine | dtypes | autodiff in the framework |", "|---|---|---|---|---|"]
    for (backend, device), cap in CAPABILITIES.items():
        engine = cap.get("engine", "?") + (f" ({cap['via']})" if "via" in cap else "")
        backend = backend + (f" (tested with {cap['tested_with']})" if "tested_with" in cap else "")
        lines.append(f"| {backend} | {device} | {engine} | {', '.join(cap.get('dtypes', ()))} | "
                     f"{order_name.get(cap.get('autodiff'), cap.get('autodiff'))} |")
    extra = sorted({k for cap in CAPABILITIES.values() for k in cap}
                   - {"engine", "dtypes", "autodiff", "via", "tested_with"})
    note = (f"\n\nOther registry fields: {', '.join(extra)}." if extra else "")
    return ("# Capabilities\n\nGenerated from `smoothmax._dispatch.CAPABILITIES`, the registry that the "
            "dispatcher and the test fixtures read. Every backend gets the value, the expected path "
            "`E` (`*_grad`) and the Hessian-vector product (`*_hvp`) as functions; the last column says "
            "how many orders of differentiation the framework's own autodiff gets through the custom "
            "passes.\n\n" + "\n".join(lines) + note)


def gallery_page(out_dir):
    """Figures and tables from ``examples/results``: the full-mode run when present, else the quick one."""
    if not os.path.isdir(RESULTS):
        return "<h1>Gallery</h1><p>No results yet: run the examples (see Examples).</p>"
    img_dir = os.path.join(out_dir, "img")
    os.makedirs(img_dir, exist_ok=True)
    body = ["<h1>Gallery</h1><p>Figures and tables written by the examples in <code>examples/</code> "
            "(<code>--quick</code> results are shown where no full run was committed).</p>"]
    order = ["barycenter", "tagging", "audio_alignment", "attention"]
    titles = {"barycenter": "Time series: soft-DTW barycenters (examples/barycenter.py)",
              "tagging": "Tagging with Vit_Ω (examples/tagging.py; paper §4.2, Table 1)",
              "audio_alignment": "Audio-to-score alignment (examples/audio_alignment.py; paper §4.3, Table 2)",
              "attention": "Structured attention (examples/attention.py; paper §5, Figure 4)"}
    for name in order:
        full, quick = os.path.join(RESULTS, name + ".md"), os.path.join(RESULTS, name + "_quick.md")
        md_path = full if os.path.exists(full) else quick if os.path.exists(quick) else None
        if md_path is None:
            continue
        suffix = "" if md_path == full else "_quick"
        body.append(f'<section class="gallery"><h2 id="{name}">{html.escape(titles[name])}</h2>')
        with open(md_path, encoding="utf-8") as f:
            body.append(render_markdown(f.read()))
        pngs = sorted(p for p in glob.glob(os.path.join(RESULTS, name + "*.png"))
                      if p.endswith(suffix + ".png") and (suffix or not p.endswith("_quick.png")))
        for png in pngs:
            shutil.copy(png, img_dir)
            body.append(f'<img src="img/{os.path.basename(png)}" alt="{os.path.basename(png)}">')
        body.append("</section>")
    return "\n".join(body)


def build(out_dir, frameworks=True):
    os.makedirs(out_dir, exist_ok=True)
    md_pages = sorted(glob.glob(os.path.join(DOCS, "*.md")))
    first = ["index.md", "examples.md"]
    md_pages.sort(key=lambda p: (first.index(os.path.basename(p)) if os.path.basename(p) in first else 9, p))
    nav = [("Home", "index.html"), ("Examples", "examples.html"), ("Gallery", "gallery.html"),
           ("API", "api.html"), ("Capabilities", "capabilities.html")]
    others = [p for p in md_pages if os.path.basename(p) not in first]
    for p in others:  # short names in the bar, full titles on the pages
        stem = os.path.basename(p)[:-3]
        short = stem.upper() if len(stem) <= 3 else stem.replace("_", " ").capitalize()
        nav.append((short, stem + ".html"))
    written = []

    def write(name, title, body):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(page(title, body, nav))
        written.append(path)

    for p in md_pages:
        with open(p, encoding="utf-8") as f:
            text = f.read()
        text = re.sub(r"\(([\w\-]+)\.md(#[\w\-]*)?\)", r"(\1.html\2)", text)  # links between pages
        write(os.path.basename(p)[:-3] + ".html", _title(p), render_markdown(text))
    write("api.html", "API reference", api_page(frameworks))
    write("capabilities.html", "Capabilities", render_markdown(capability_table()))
    write("gallery.html", "Gallery", gallery_page(out_dir))
    return written


def _title(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# "):
                return line[2:].strip()
    return os.path.basename(path)[:-3]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the smoothmax documentation site.")
    parser.add_argument("--out", default=os.path.join(DOCS, "_build"))
    parser.add_argument("--no-framework", action="store_true", help="skip smoothmax.torch / smoothmax.jax")
    args = parser.parse_args(argv)
    written = build(args.out, frameworks=not args.no_framework)
    print(f"wrote {len(written)} pages to {args.out}: open {os.path.join(args.out, 'index.html')}")


if __name__ == "__main__":
    main()
