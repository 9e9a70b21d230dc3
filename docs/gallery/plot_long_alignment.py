"""
Long alignment in linear memory
===============================

``examples/long_alignment.py``: the first movement of Beethoven's string
quartet op. 59 no. 3 (music21's corpus) rendered twice under two random tempo
curves, more than 30,000 chroma frames a side, aligned by
:func:`smoothmax.dtw_features_grad` without forming the cost matrix. Run it with
``python examples/long_alignment.py`` (``--quick`` for the first 200 quarters).
"""
from _results import figure, table  # docs/gallery/_results.py

table("long_alignment")

# %%
# The alignment read from the gradient, against the true one:
figure("long_alignment")
