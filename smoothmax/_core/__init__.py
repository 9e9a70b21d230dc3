"""Compiled CPU engine (Cython): ``dtw`` and ``viterbi`` kernels.

See ``docs/engines.md`` for the contract. The extension modules are imported
by ``smoothmax._dispatch``; nothing is imported here so that a missing build
is reported where the engine is chosen, not at ``import smoothmax``.
"""
