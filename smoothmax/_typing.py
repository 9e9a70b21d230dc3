"""Type aliases of the public signatures, for IDEs and mypy (nothing checks them at run time).

``Array`` is ``Any``: the functions take and return arrays of any array-API
library (NumPy, PyTorch, JAX, CuPy, array-api-strict, ...), and no static type
spans them all; a union would make every user of one library cast its results.
The other parameters are typed exactly, so that ``gamma="one"`` or
``reg="entropy"`` is flagged by a type checker before it raises at run time.
"""
from typing import Any, Literal, Optional, TypeAlias, Union

Array: TypeAlias = Any
"""An array of any array-API library (NumPy, PyTorch, JAX, CuPy, ...)."""

Reg: TypeAlias = Literal["negentropy", "l2", "hard"]
"""The regulariser Ω of docs/spec.md §1."""

Lengths: TypeAlias = Optional[Array]
"""Per-item lengths: None (full length) or an int array broadcast to the batch shape."""

DTWLengths: TypeAlias = Union[None, "tuple[Any, Any]", Array]
"""None, a pair ``(len_a, len_b)`` or an int array of shape ``(..., 2)``."""

Seed: TypeAlias = Union[None, int, Any]
"""A seed for :func:`numpy.random.default_rng` (None, an int or a Generator)."""

__all__ = ["Array", "Reg", "Lengths", "DTWLengths", "Seed"]
