"""pytest at the repository root: ``pytest --doctest-modules smoothmax`` collects
the docstrings' Examples of the modules whose framework is installed (the
framework modules import torch / jax at import time)."""
import importlib.util

collect_ignore = [
    f"smoothmax/{module}.py"
    for module, needs in (("torch", "torch"), ("_torch_crf", "torch"), ("jax", "jax"), ("_jax_crf", "jax"))
    if importlib.util.find_spec(needs) is None
]
