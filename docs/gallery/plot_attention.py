"""
Structured attention (paper §5, Figure 4)
=========================================

``examples/attention.py``: a sequence-to-sequence model (number words to
digits) whose attention weights are the marginals of a two-state chain
(:func:`smoothmax.attention.structured_attention`), against softmax attention.
Run it with ``python examples/attention.py`` (``--quick`` for a smoke run).
"""
from _results import figure, table  # docs/gallery/_results.py

table("attention")

# %%
# Attention weights of one test sequence (softmax, negentropy, ℓ2²):
figure("attention")
