"""Agreement with the peers a user would compare against (docs/spec.md §7).

* tslearn soft-DTW (``SoftDTW`` on a cost matrix: value and gradient; the
  banded ``soft_dtw_alignment``), hard ``dtw_path``;
* torch-struct ``LinearChainCRF`` log-partition, marginals, max and argmax;
* pytorch-crf (``torchcrf.CRF``) log-likelihood and decoding.

Each peer is skipped with a reason when it is not installed (they come with
the ``bench`` extra and are installed in CI).
"""
import warnings

import numpy as np
import pytest

import smoothmax as sm

# ---------------------------------------------------------------------------
# tslearn (soft-DTW, Cuturi & Blondel 2017)


@pytest.fixture(scope="module")
def tslearn_metrics():
    return pytest.importorskip("tslearn.metrics", reason="tslearn not installed (bench extra)")


def _sq_cost(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("NA,NB", [(1, 1), (1, 6), (5, 7), (9, 4), (16, 16)])
@pytest.mark.parametrize("gamma", [0.01, 0.5, 10.0])
def test_tslearn_softdtw_value_and_gradient(tslearn_metrics, NA, NB, gamma):
    """negentropy DTW on any cost matrix is tslearn's SoftDTW; E is its gradient w.r.t. D."""
    rng = np.random.default_rng(NA * 100 + NB)
    D = rng.normal(size=(NA, NB)) + 0.5  # any real costs, not only distances
    s = tslearn_metrics.SoftDTW(D, gamma=gamma)
    ref = s.compute()
    refE = s.grad()
    v, E = sm.dtw_grad(D, gamma=gamma)
    np.testing.assert_allclose(v, ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(E, refE, rtol=1e-8, atol=1e-10)
    v32, E32 = sm.dtw_grad(D.astype(np.float32), gamma=gamma)
    np.testing.assert_allclose(v32, ref, rtol=1e-4, atol=1e-4 * (1 + np.abs(D).sum()))
    np.testing.assert_allclose(E32, refE, atol=1e-4)


@pytest.mark.parametrize("NA,NB,radius", [(5, 7, 0), (5, 7, 1), (8, 3, 1), (6, 6, 2), (4, 9, 3)])
def test_tslearn_banded_alignment(tslearn_metrics, NA, NB, radius):
    """``band`` is tslearn's Sakoe-Chiba radius: soft_dtw_alignment and dtw_path agree."""
    rng = np.random.default_rng(NA * 10 + NB + radius)
    a, b = rng.normal(size=(NA, 2)), rng.normal(size=(NB, 2))
    D = _sq_cost(a, b)
    A, sim = tslearn_metrics.soft_dtw_alignment(a, b, gamma=0.3, sakoe_chiba_radius=radius)
    v, E = sm.dtw_grad(D, gamma=0.3, band=radius)
    np.testing.assert_allclose(v, sim, rtol=1e-10)
    np.testing.assert_allclose(E, A, atol=1e-10)
    path, dist = tslearn_metrics.dtw_path(a, b, sakoe_chiba_radius=radius)
    cost, Y = sm.dtw_path(D, band=radius)
    np.testing.assert_allclose(cost, dist ** 2, rtol=1e-10)  # tslearn returns sqrt of the summed squares
    Yref = np.zeros_like(D)
    for i, j in path:
        Yref[i, j] = 1
    np.testing.assert_array_equal(Y, Yref)


def test_tslearn_lengths_are_truncation(tslearn_metrics):
    """A padded batch with lengths equals tslearn on each unpadded pair."""
    rng = np.random.default_rng(3)
    theta = rng.normal(size=(3, 6, 8)) ** 2
    la, lb = np.array([6, 2, 5]), np.array([8, 7, 1])
    v, E = sm.dtw_grad(theta, gamma=0.8, lengths=(la, lb))
    for k in range(3):
        s = tslearn_metrics.SoftDTW(theta[k, :la[k], :lb[k]], gamma=0.8)
        np.testing.assert_allclose(v[k], s.compute(), rtol=1e-10)
        np.testing.assert_allclose(E[k, :la[k], :lb[k]], s.grad(), atol=1e-10)


# ---------------------------------------------------------------------------
# torch-struct LinearChainCRF


@pytest.fixture(scope="module")
def torch_struct():
    pytest.importorskip("torch", reason="torch not installed")
    return pytest.importorskip("torch_struct", reason="torch-struct not installed (bench extra)")


def _torch_struct_dist(torch_struct, theta, lengths=None):
    """torch-struct's chain for our ``theta``.

    torch-struct's log-potentials ``phi[b, n, z_{n+1}, z_n]`` (shape
    ``(B, N-1, C, C)``) score a chain of ``N`` nodes whose *first node has no
    unary term*, so ``z_0`` ranges freely over the ``C`` states. That is
    exactly our virtual start state ``y_{-1}`` (``V_{-1} = 0`` for every
    state): with ``z_0 = y_{-1}`` and ``z_{t+1} = y_t``,
    ``phi[b, t, i, j] = theta[b, t, i, j]`` with no transposition, ``N = T + 1``
    and torch-struct's ``lengths`` (node counts) equal to ours plus one.
    """
    import torch

    lp = torch.tensor(theta)
    L = None if lengths is None else torch.tensor(np.asarray(lengths) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_struct.LinearChainCRF(lp, lengths=L)


@pytest.mark.parametrize("lengths", [None, [5, 1, 3, 4]], ids=["full", "lengths"])
def test_torch_struct_partition_and_marginals(torch_struct, lengths):
    rng = np.random.default_rng(11)
    theta = rng.normal(size=(4, 5, 3, 3)) * 2
    theta[1, 0, 0, :] = -np.inf  # masks are shared by both conventions
    d = _torch_struct_dist(torch_struct, theta, lengths)
    v, E = sm.viterbi_grad(theta, reg="negentropy", gamma=1.0, lengths=lengths)
    np.testing.assert_allclose(v, d.partition.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(E, d.marginals.detach().numpy(), atol=1e-10)
    score, tags = sm.viterbi_decode(theta, lengths=lengths)
    np.testing.assert_allclose(score, d.max.detach().numpy(), rtol=1e-10)
    Yh = sm.viterbi_grad(theta, reg="hard", lengths=lengths)[1]
    np.testing.assert_array_equal(Yh, d.argmax.detach().numpy())


# ---------------------------------------------------------------------------
# pytorch-crf


@pytest.fixture(scope="module")
def torchcrf():
    pytest.importorskip("torch", reason="torch not installed")
    return pytest.importorskip("torchcrf", reason="pytorch-crf not installed (bench extra)")


def _crf_to_theta(start, end, trans, emissions, lengths):
    """pytorch-crf's parameters as our ``theta`` (B, T, S, S).

    pytorch-crf scores ``start[y_0] + Σ_t em[t, y_t] + Σ_{t>=1} trans[y_{t-1}, y_t] + end[y_{L-1}]``
    (``trans[from, to]``). We fix the virtual start state to 0 by putting
    ``-inf`` in ``theta[:, 0, :, j != 0]`` (docs/spec.md §3), transpose the transitions
    (``theta[t, i, j]`` goes *to* ``i`` *from* ``j``) and add ``end`` at each
    item's last step.
    """
    B, T, S = emissions.shape
    theta = np.empty((B, T, S, S))
    theta[:, 0] = -np.inf
    theta[:, 0, :, 0] = start[None, :] + emissions[:, 0]
    theta[:, 1:] = trans.T[None, None] + emissions[:, 1:, :, None]
    for b in range(B):
        theta[b, lengths[b] - 1] += end[:, None]
    return theta


def test_pytorch_crf_log_likelihood_and_decode(torchcrf):
    import torch

    rng = np.random.default_rng(5)
    B, T, S = 5, 6, 4
    crf = torchcrf.CRF(S, batch_first=True).double()
    with torch.no_grad():
        crf.start_transitions.copy_(torch.tensor(rng.normal(size=S)))
        crf.end_transitions.copy_(torch.tensor(rng.normal(size=S)))
        crf.transitions.copy_(torch.tensor(rng.normal(size=(S, S))))
    em = rng.normal(size=(B, T, S))
    lengths = np.array([6, 1, 3, 6, 2])
    mask = np.arange(T)[None] < lengths[:, None]
    tags = rng.integers(0, S, size=(B, T)) * mask
    ll = crf(torch.tensor(em), torch.tensor(tags), mask=torch.tensor(mask), reduction="none").detach().numpy()
    theta = _crf_to_theta(crf.start_transitions.detach().numpy(), crf.end_transitions.detach().numpy(),
                          crf.transitions.detach().numpy(), em, lengths)
    logZ = sm.viterbi(theta, reg="negentropy", gamma=1.0, lengths=lengths)
    score = np.array([sum(theta[b, t, tags[b, t], tags[b, t - 1] if t else 0] for t in range(lengths[b]))
                      for b in range(B)])
    np.testing.assert_allclose(score - logZ, ll, rtol=1e-10)
    best = crf.decode(torch.tensor(em), mask=torch.tensor(mask))
    _, ours = sm.viterbi_decode(theta, lengths=lengths)
    for b in range(B):
        np.testing.assert_array_equal(ours[b, :lengths[b]], best[b])
        assert np.all(ours[b, lengths[b]:] == -1)
