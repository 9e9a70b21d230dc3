"""Soft-DTW barycenters and nearest-centroid classification on UCR time series.

For each class ``c`` of a UCR data set (shipped by ``aeon==1.6.0``), the
barycenter ``z_c`` minimises the mean smoothed DTW to the training series::

    z_c = argmin_z  1/K Σ_k DTW_Ω(C(z, x_k)),   C(z, x)[i, j] = ||z_i − x_j||²

with Ω = negentropy (soft-DTW, Cuturi & Blondel 2017) or Ω = squared ℓ2
(sparse DTW, Mensch & Blondel 2018). The gradient is the chain rule through
the cost: with ``E_k = ∇DTW_Ω(C(z, x_k))`` (one call of ``smoothmax.dtw_grad``
for the whole class),
``∂/∂z_i = 1/K Σ_k Σ_j E_k[i, j] · 2 (z_i − x_kj)``; L-BFGS (SciPy) does the rest.

Test series are assigned to the nearest barycenter under the matching
divergence ``D_Ω(x, z) = DTW_Ω(x, z) − ½ (DTW_Ω(x, x) + DTW_Ω(z, z))``;
the Euclidean mean (with the Euclidean distance, and with hard DTW) is the baseline.

    python examples/barycenter.py --quick     # GunPoint + ItalyPowerDemand, 50 L-BFGS steps
    python examples/barycenter.py             # + ArrowHead, 200 steps (--datasets OSULeaf ... for more); γ ∈ {0.1, 1, 10} in both
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import figure_path, limit_threads, markdown_table, tqdm, write_results  # noqa: E402

import smoothmax as sm  # noqa: E402
from _data import load_ucr  # noqa: E402


def sq_cost(Z, X):
    """Squared Euclidean costs between a series ``Z (m, d)`` and series ``X (K, n, d)``: ``(K, m, n)``."""
    return (np.sum(Z ** 2, -1)[None, :, None] + np.sum(X ** 2, -1)[:, None, :]
            - 2.0 * np.einsum("md,knd->kmn", Z, X)).clip(min=0.0)


def barycenter_objective(z_flat, X, shape, reg, gamma):
    """Mean DTW_Ω between the barycenter and the series, and its gradient (chain rule through C)."""
    Z = z_flat.reshape(shape)
    values, E = sm.dtw_grad(sq_cost(Z, X), reg=reg, gamma=gamma)
    K = X.shape[0]
    # d C[k, i, j] / d z_i = 2 (z_i - x_kj), contracted with E[k, i, j]
    grad = 2.0 * (E.sum(axis=(0, 2))[:, None] * Z - np.einsum("kmn,knd->md", E, X)) / K
    return float(values.mean()), grad.ravel()


def dtw_barycenter(X, reg, gamma, init, maxiter=100):
    """Barycenter of the series ``X (K, n, d)`` under DTW_Ω, by L-BFGS (plain GD without SciPy)."""
    shape = init.shape
    try:
        from scipy.optimize import minimize
    except ImportError:
        minimize = None
    if minimize is not None:
        res = minimize(barycenter_objective, init.ravel(), args=(X, shape, reg, gamma),
                       jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
        return res.x.reshape(shape), float(res.fun), int(res.nit)
    z, step = init.ravel().copy(), 0.1
    f, g = barycenter_objective(z, X, shape, reg, gamma)
    for it in range(maxiter):
        z_new = z - step * g
        f_new, g_new = barycenter_objective(z_new, X, shape, reg, gamma)
        if f_new <= f:
            z, f, g, step = z_new, f_new, g_new, step * 1.2
        else:
            step *= 0.5
    return z.reshape(shape), f, maxiter


def dtw_values(X, Z, reg, gamma, chunk=32):
    """DTW_Ω(C(z, x)) for every series of ``X (n, T, d)`` against one ``Z (m, d)``."""
    out = np.empty(len(X))
    for s in range(0, len(X), chunk):
        theta = sq_cost(Z, X[s:s + chunk])
        if reg == "hard":
            out[s:s + chunk] = sm.dtw_path(theta)[0]
        else:
            out[s:s + chunk] = sm.dtw(theta, reg=reg, gamma=gamma)
    return out


def self_values(X, reg, gamma):
    """DTW_Ω(C(x, x)) of each series, for the divergence."""
    if reg == "hard":
        return np.zeros(len(X))
    return np.array([sm.dtw(sq_cost(x, x[None]), reg=reg, gamma=gamma)[0] for x in X])


def run_dataset(name, gammas, maxiter, bar):
    X_tr, y_tr, X_te, y_te = load_ucr(name)
    X_tr, X_te = X_tr[..., None], X_te[..., None]  # (n, T, 1)
    classes = sorted(set(y_tr))
    means = {c: X_tr[y_tr == c].mean(0) for c in classes}
    methods = {"Euclidean mean + Euclidean distance": None, "Euclidean mean + DTW": None}
    rows, barycenters = [], {"euclidean": means}

    def accuracy(dist):  # dist: (n_classes, n_test)
        pred = np.asarray(classes)[np.argmin(dist, 0)]
        return float(np.mean(pred == y_te))

    d_euc = np.stack([((X_te - means[c][None]) ** 2).sum((1, 2)) for c in classes])
    rows.append({"method": "Euclidean mean", "distance": "Euclidean", "reg": "-", "gamma": None,
                 "accuracy": accuracy(d_euc), "seconds": 0.0})
    d_dtw = np.stack([dtw_values(X_te, means[c], "hard", 1.0) for c in classes])
    rows.append({"method": "Euclidean mean", "distance": "DTW", "reg": "hard", "gamma": None,
                 "accuracy": accuracy(d_dtw), "seconds": 0.0})
    bar.update(1)
    for reg in ("negentropy", "l2"):
        for gamma in gammas:
            t0 = time.perf_counter()
            bary, iters = {}, []
            for c in classes:
                z, _, nit = dtw_barycenter(X_tr[y_tr == c], reg, gamma, means[c], maxiter)
                bary[c], iters = z, iters + [nit]
            self_te = self_values(X_te, reg, gamma)
            dist = np.stack([dtw_values(X_te, bary[c], reg, gamma)
                             - 0.5 * (self_te + self_values(bary[c][None], reg, gamma)[0])
                             for c in classes])
            rows.append({"method": f"DTW_{reg} barycenter", "distance": f"D_{reg}", "reg": reg,
                         "gamma": gamma, "accuracy": accuracy(dist), "lbfgs_iters": iters,
                         "seconds": time.perf_counter() - t0})
            barycenters[(reg, gamma)] = bary
            bar.update(1)
    info = {"n_train": len(X_tr), "n_test": len(X_te), "length": X_tr.shape[1], "classes": classes}
    return rows, barycenters, info, (X_tr, y_tr)


def plot_barycenters(all_results, path, gamma_plot):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(all_results)
    n_cls = max(len(r["info"]["classes"]) for r in all_results.values())
    n_cls = min(n_cls, 3)
    fig, axes = plt.subplots(n, n_cls, figsize=(3.6 * n_cls, 2.4 * n), squeeze=False)
    for row, (name, res) in enumerate(all_results.items()):
        X_tr, y_tr = res["train"]
        for col in range(n_cls):
            ax = axes[row, col]
            if col >= len(res["info"]["classes"]):
                ax.axis("off")
                continue
            c = res["info"]["classes"][col]
            for x in X_tr[y_tr == c][:15]:
                ax.plot(x[:, 0], color="0.8", lw=0.6)
            ax.plot(res["bary"]["euclidean"][c][:, 0], color="k", lw=1.2, ls="--", label="Euclidean mean")
            ax.plot(res["bary"][("negentropy", gamma_plot)][c][:, 0], color="C0", lw=1.5,
                    label=f"soft-DTW (negentropy, γ={gamma_plot:g})")
            ax.plot(res["bary"][("l2", gamma_plot)][c][:, 0], color="C3", lw=1.5,
                    label=f"DTW_ℓ2 (γ={gamma_plot:g})")
            ax.set_title(f"{name}, class {c}", fontsize=9)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_alignments(name, res, path, gamma_plot):
    """Expected alignment E between one test-like series and its class barycenter, negentropy vs l2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X_tr, y_tr = res["train"]
    c = res["info"]["classes"][0]
    x = X_tr[y_tr == c][0]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
    for ax, reg in zip(axes, ("negentropy", "l2")):
        z = res["bary"][(reg, gamma_plot)][c]
        _, E = sm.dtw_grad(sq_cost(z, x[None])[0], reg=reg, gamma=gamma_plot)
        ax.imshow(E, cmap="Greys", origin="lower", aspect="auto", vmin=0, vmax=1)
        nz = 100.0 * np.mean(E > 0)
        ax.set_title(f"E = ∇DTW_{reg}, γ={gamma_plot:g}\n{nz:.1f}% non-zero cells", fontsize=9)
        ax.set_xlabel("training series")
        ax.set_ylabel("barycenter")
    fig.suptitle(f"{name}: expected alignments", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two data sets, 50 L-BFGS steps (under a minute)")
    parser.add_argument("--datasets", nargs="+", default=None)
    parser.add_argument("--gammas", nargs="+", type=float, default=None)
    parser.add_argument("--maxiter", type=int, default=None)
    args = parser.parse_args(argv)
    limit_threads(1)
    mode = "quick" if args.quick else "full"
    datasets = args.datasets or (["GunPoint", "ItalyPowerDemand"] if args.quick
                                 else ["GunPoint", "ItalyPowerDemand", "ArrowHead"])
    gammas = args.gammas or [0.1, 1.0, 10.0]
    maxiter = args.maxiter or (50 if args.quick else 200)
    gamma_plot = 1.0 if 1.0 in gammas else gammas[0]

    all_results = {}
    bar = tqdm(total=len(datasets) * (1 + 2 * len(gammas)), desc="barycenters")
    for name in datasets:
        bar.set_postfix(dataset=name)
        rows, bary, info, train = run_dataset(name, gammas, maxiter, bar)
        all_results[name] = {"rows": rows, "bary": bary, "info": info, "train": train}
    bar.close()

    # Table: rows = method, columns = data sets (accuracy in %)
    keys = [(r["method"], r["distance"], r["gamma"]) for r in all_results[datasets[0]]["rows"]]
    table_rows = []
    for key in keys:
        method, dist, gamma = key
        label = method + (f", γ={gamma:g}" if gamma is not None else "") + f" ({dist})"
        accs = [next(100 * r["accuracy"] for r in all_results[d]["rows"]
                     if (r["method"], r["distance"], r["gamma"]) == key) for d in datasets]
        table_rows.append([label] + accs)
    md = ["## Nearest-centroid classification on UCR data sets (test accuracy, %)", "",
          markdown_table(["centroid (distance)"] + datasets, table_rows), "",
          "Barycenters: L-BFGS on the mean DTW_Ω to the class's training series, started "
          "from the Euclidean mean, gradient by `smoothmax.dtw_grad` and the chain rule through "
          "the squared-Euclidean cost. Test series go to the centroid of smallest divergence "
          "D_Ω(x, z) = DTW_Ω(x, z) − ½(DTW_Ω(x, x) + DTW_Ω(z, z)).", "",
          "| data set | train | test | length | classes |", "|---|---:|---:|---:|---:|"]
    md += [f"| {d} | {r['info']['n_train']} | {r['info']['n_test']} | {r['info']['length']} | "
           f"{len(r['info']['classes'])} |" for d, r in all_results.items()]
    payload = {"datasets": {d: {"info": r["info"], "rows": r["rows"]} for d, r in all_results.items()}}
    json_path, md_path = write_results("barycenter", payload, "\n".join(md), mode)

    fig1 = figure_path("barycenter", mode)
    plot_barycenters(all_results, fig1, gamma_plot)
    fig2 = figure_path("barycenter_alignment", mode)
    plot_alignments(datasets[0], all_results[datasets[0]], fig2, gamma_plot)
    print("\n".join(md[:3 + len(table_rows)]))
    print("wrote", json_path, md_path, fig1, fig2)


if __name__ == "__main__":
    main()
