"""
Sequence tagging with Vit_Ω (paper §4.2, Table 1)
=================================================

``examples/tagging.py``: a BiLSTM tagger trained with the Viterbi losses of
:mod:`smoothmax.losses` (surrogate: CRF negative log-likelihood and its ℓ2²
counterpart; relaxed; structured perceptron) on Hebrew named entities (NEMO)
and Portuguese part-of-speech tags (PetroGold), from CoNLL-U files shipped by
pinned packages. Run it with ``python examples/tagging.py`` (hours on two CPU
cores; ``--quick`` for a smoke run).
"""
from _results import figure, table  # docs/gallery/_results.py

table("tagging")

# %%
# Marginals E.sum(-1) of one test sentence under each regulariser:
figure("tagging_marginals_nemo")
figure("tagging_marginals_petrogold")
