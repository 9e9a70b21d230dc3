"""
Soft-DTW barycenters on UCR time series
=======================================

``examples/barycenter.py``: nearest-centroid classification of UCR data sets
(GunPoint, ItalyPowerDemand, ArrowHead, shipped by ``aeon``) with centroids
computed as DTW_Ω barycenters for negentropy and ℓ2², against Euclidean means.
Run it with ``python examples/barycenter.py`` (``--quick`` for a smoke run).
"""
from _results import figure, table  # docs/gallery/_results.py

table("barycenter")

# %%
# The barycenters of each class, and an alignment to one of them:
figure("barycenter")
figure("barycenter_alignment")
