"""Every public function and class carries type annotations (docs/development.md, "Types").

``mypy smoothmax`` (in CI) checks that the annotations are consistent with the
code; this test checks that they are there at all: a public callable whose
parameters or return are unannotated is seen as ``Any`` by mypy and IDEs.
"""
import importlib
import importlib.util
import inspect

import pytest

MODULES = ["smoothmax", "smoothmax.losses", "smoothmax.attention", "smoothmax.crf", "smoothmax.torch",
           "smoothmax.jax"]
NEEDS = {"smoothmax.torch": "torch", "smoothmax.jax": "jax", "smoothmax.attention": None}


def _public_callables(modname):
    mod = importlib.import_module(modname)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.ismodule(obj):
            continue
        if inspect.isclass(obj):
            for meth_name, meth in vars(obj).items():
                if meth_name.startswith("_") and meth_name != "__init__":
                    continue
                fn = meth.__func__ if isinstance(meth, (staticmethod, classmethod)) else meth
                if inspect.isfunction(fn):
                    yield f"{modname}.{name}.{meth_name}", fn, isinstance(meth, staticmethod)
        elif callable(obj):
            yield f"{modname}.{name}", obj, False


def _missing(fn, static):
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not static and params and params[0].name in ("self", "cls"):
        params = params[1:]
    if static and params and params[0].name == "ctx":  # torch.autograd.Function's context
        params = params[1:]
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


@pytest.mark.parametrize("modname", MODULES)
def test_public_callables_are_annotated(modname):
    framework = NEEDS.get(modname, modname.split(".")[-1] if modname != "smoothmax" else None)
    if modname in ("smoothmax.torch", "smoothmax.jax"):
        pytest.importorskip(framework)
    found = list(_public_callables(modname))
    assert found, f"no public callable found in {modname}"
    bad = {name: m for name, fn, static in found if (m := _missing(fn, static))}
    assert not bad, f"unannotated parameters / returns: {bad}"


def test_attention_layer_is_annotated():
    pytest.importorskip("torch")
    from smoothmax.attention import StructuredAttention

    for meth in ("__init__", "forward", "extra_repr"):
        assert not _missing(getattr(StructuredAttention, meth), False), meth


def test_package_ships_py_typed():
    import smoothmax

    spec = importlib.util.find_spec("smoothmax")
    assert spec is not None and spec.submodule_search_locations
    import os

    assert os.path.exists(os.path.join(os.path.dirname(smoothmax.__file__), "py.typed"))
