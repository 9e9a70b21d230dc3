"""
Audio-to-score alignment (paper §4.3, Table 2)
==============================================

``examples/audio_alignment.py``: Bach chorales (music21's corpus) synthesized
under random tempo curves, aligned to their scores by DTW_Ω on the output of
a linear pitch-class classifier trained end to end through ∇DTW_Ω (the area
loss of :func:`smoothmax.losses.dtw_relaxed`), and one real performance (Mozart
K.265, partitura's ``.match`` data). Run it with
``python examples/audio_alignment.py`` (``--quick`` for a smoke run).
"""
from _results import figure, table  # docs/gallery/_results.py

table("audio_alignment")

# %%
# Predicted and true alignments of a test chorale, and of the real performance:
figure("audio_alignment")
figure("audio_alignment_mozart")
