"""smoothmax: differentiable dynamic programming (Mensch & Blondel, ICML 2018).

Smoothed DTW and Viterbi operators -- value, expected path (gradient),
Hessian-vector product and hard decoding -- for NumPy, PyTorch, JAX and CuPy.
"""
from .dtw import dtw, dtw_features, dtw_features_grad, dtw_grad, dtw_hvp, dtw_path
from .smooth import smooth_argmax, smooth_max
from .viterbi import viterbi, viterbi_decode, viterbi_grad, viterbi_hvp
from .dag import DAG, dag, dag_grad, dag_hvp, dag_path
from .sampling import dag_sample, dag_support, dtw_sample, viterbi_sample
from . import attention, crf, losses
from ._runtime import clear_cache, get_num_threads, set_num_threads
from . import _problem


def _load_torch():
    from . import torch  # noqa: F401  (registers itself with the dispatcher)


def _load_jax():
    from . import jax  # noqa: F401  (registers itself with the dispatcher)


# The framework adapters are imported the first time a tensor of theirs arrives,
# except that smoothmax.torch is imported now when torch already is: a first
# call traced by torch.compile must find its operators registered (an import
# inside the traced code would break the graph).
_problem.register_adapter_loader("torch", _load_torch)
_problem.register_adapter_loader("jax", _load_jax)
del _load_torch, _load_jax
if "torch" in __import__("sys").modules:
    _problem.adapter_for("torch")

__version__ = "0.1.0"

__all__ = [
    "smooth_max",
    "smooth_argmax",
    "dtw",
    "dtw_grad",
    "dtw_hvp",
    "dtw_path",
    "dtw_features",
    "dtw_features_grad",
    "viterbi",
    "viterbi_grad",
    "viterbi_hvp",
    "viterbi_decode",
    "DAG",
    "dag",
    "dag_grad",
    "dag_hvp",
    "dag_path",
    "dag_sample",
    "viterbi_sample",
    "dtw_sample",
    "dag_support",
    "losses",
    "attention",
    "crf",
    "set_num_threads",
    "get_num_threads",
    "clear_cache",
]
