"""Write the offline fallback intersphinx inventories of ``docs/_inv/``.

``docs/conf.py`` looks each inventory up on the project's site first; where the
network cannot be reached (as on the build machines of this project) Sphinx
reads these files instead, without a warning. They hold only the names that
our docstrings and pages cite, with their addresses on the projects' sites,
so the links are the same as with the full inventories. Add a name here when
a docstring cites one that is missing, then run ``python docs/_inv/make_fallback.py``.
"""
import os
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

# project -> (version, [(name, domain:role, relative URI)]); "$" stands for the name
ENTRIES = {
    "python": ("3", [
        ("ValueError", "py:exception", "library/exceptions.html#$"),
        ("TypeError", "py:exception", "library/exceptions.html#$"),
        ("float", "py:class", "library/functions.html#$"),
        ("int", "py:class", "library/functions.html#$"),
        ("str", "py:class", "library/stdtypes.html#$"),
        ("tuple", "py:class", "library/stdtypes.html#$"),
        ("bool", "py:class", "library/functions.html#$"),
        ("None", "py:data", "library/constants.html#$"),
    ]),
    "numpy": ("2", [
        ("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html#$"),
        ("numpy.float32", "py:attribute", "reference/arrays.scalars.html#$"),
        ("numpy.float64", "py:attribute", "reference/arrays.scalars.html#$"),
        ("numpy.random.Generator", "py:class", "reference/random/generator.html#$"),
    ]),
    "torch": ("2", [
        ("torch.Tensor", "py:class", "tensors.html#$"),
        ("torch.nn.Module", "py:class", "generated/torch.nn.Module.html#$"),
        # the path autodoc writes for the base class of our layers ("Bases: ...")
        ("torch.nn.modules.module.Module", "py:class", "generated/torch.nn.Module.html#torch.nn.Module"),
        ("torch.autograd.function.Function", "py:class", "autograd.html#torch.autograd.Function"),
        ("torch.autograd.Function", "py:class", "autograd.html#$"),
        ("torch.compile", "py:function", "generated/torch.compile.html#$"),
    ]),
    "jax": ("0.4", [
        ("jax.Array", "py:class", "_autosummary/jax.Array.html#$"),
        ("jax.jit", "py:function", "_autosummary/jax.jit.html#$"),
        ("jax.vmap", "py:function", "_autosummary/jax.vmap.html#$"),
        ("jax.grad", "py:function", "_autosummary/jax.grad.html#$"),
        ("jax.custom_vjp", "py:class", "_autosummary/jax.custom_vjp.html#$"),
    ]),
}


def write(project, version, entries):
    header = (f"# Sphinx inventory version 2\n# Project: {project}\n# Version: {version}\n"
              "# The remainder of this file is compressed using zlib.\n").encode()
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in entries).encode()
    with open(os.path.join(HERE, f"{project}.inv"), "wb") as f:
        f.write(header + zlib.compress(body))


if __name__ == "__main__":
    for project, (version, entries) in ENTRIES.items():
        write(project, version, entries)
