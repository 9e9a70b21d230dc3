"""Aligning two long performances of one piece with soft-DTW in linear memory.

Data. The first movement of Beethoven's string quartet op. 59 no. 3 from
music21's corpus (MusicXML, read without importing music21), rendered twice
by the additive synthesizer of ``audio_alignment.py``, each time with its own
random, smooth tempo curve and timbre: about nine minutes of audio per side,
framed at 64 frames per second, i.e. more than 30,000 frames per side. The
two tempo curves give the true alignment.

Features: 12-bin chroma (the semitone-band log spectra of
``audio_alignment.features`` folded into pitch classes), normalised to unit
norm, so that the squared Euclidean cost is ``2·(1 − cos)``.

Alignment. ``smoothmax.dtw_features_grad`` computes soft-DTW (negentropy)
and hard DTW between the two feature sequences and the gradients with
respect to the features without ever forming the 30k × 30k cost matrix
(the cost-matrix path would need ``theta``, ``E`` and two weights a cell:
tens of GB). The alignment is read from the gradient: two auxiliary
feature columns, ``0`` on the x side and ``(s·j, s)`` on the y side
(s = 1e-9: a cell's cost moves by at most 1e-9), give
``grad_x[i] = −2s·(Σ_j E[i, j]·j, Σ_j E[i, j])``, whose ratio is the
expected frame of y aligned with frame i of x (for hard DTW, the mean frame
of the optimal path on row i).

Metric: mean absolute deviation, in seconds, between that aligned time and
the true one, over the frames of x. Wall time and peak memory (the high-water
resident set during the call minus the resident set before it) are printed.

    python examples/long_alignment.py            # the whole movement (> 30k frames a side)
    python examples/long_alignment.py --quick    # its first 200 quarters
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import numpy as np  # noqa: E402
from _common import figure_path, limit_threads, markdown_table, write_results  # noqa: E402
from _data import _package_file, read_musicxml_notes  # noqa: E402
from _memory import fix_mmap_threshold, measured  # noqa: E402  (bench/_memory.py)

limit_threads(1)

import audio_alignment as aa  # noqa: E402  (synthesizer and semitone-band features)

import smoothmax as sm  # noqa: E402

PIECE = ("beethoven", "opus59no3", "movement1.mxl")
FPS = 64
HOP = aa.SR // FPS       # 125 samples at 8 kHz
AUX = 1e-9               # scale of the auxiliary columns that read the alignment off the gradient


def chroma(audio):
    """Unit-norm 12-bin chroma, one row per hop, computed in chunks of frames (bounded memory)."""
    window = np.hanning(aa.WIN)
    n_frames = 1 + max(0, len(audio) - aa.WIN) // HOP
    pad = np.pad(audio, (aa.WIN // 2, aa.WIN // 2))
    freqs = np.fft.rfftfreq(aa.WIN, 1 / aa.SR)
    midi = np.round(69 + 12 * np.log2(np.maximum(freqs, 1e-3) / 440.0)).astype(int)
    keep = (midi >= aa.LOW) & (midi < aa.HIGH)
    fold = np.zeros((len(freqs), 12))
    fold[np.nonzero(keep)[0], midi[keep] % 12] = 1.0
    out = np.empty((n_frames, 12))
    for s in range(0, n_frames, 4096):
        idx = np.arange(aa.WIN)[None, :] + HOP * np.arange(s, min(s + 4096, n_frames))[:, None]
        spec = np.abs(np.fft.rfft(pad[idx] * window, axis=1)) ** 2
        out[s:s + len(idx)] = spec @ fold
    out = np.log1p(100.0 * out / (out.max() + 1e-12))
    out += 1e-3  # silent frames: a flat chroma instead of a zero row
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def performance(notes, seed):
    """Audio features of one rendering, and its beat -> seconds map."""
    rng = np.random.default_rng(seed)
    end_beat = max(on + dur for on, dur, _ in notes)
    beat_to_s = aa.random_tempo(end_beat, rng, base_bpm=rng.uniform(100, 120), depth=0.3)
    perf = [(beat_to_s(on), beat_to_s(on + dur), midi, rng.integers(60, 100)) for on, dur, midi in notes]
    return chroma(aa.synthesize(perf, rng=rng)), beat_to_s, end_beat


def aligned_frames(x, y, reg, gamma):
    """Value, the expected frame of y for every frame of x, wall time and peak bytes of the gradient call."""
    NB = len(y)
    xa = np.concatenate([x, np.zeros((len(x), 2))], axis=1)
    ya = np.concatenate([y, AUX * np.stack([np.arange(NB, dtype=float), np.ones(NB)], axis=1)], axis=1)
    sm.clear_cache()  # the workspace an earlier call left in the cache would hide this call's peak
    (value, gx, _), seconds, peak, _ = measured(lambda: sm.dtw_features_grad(xa, ya, reg=reg, gamma=gamma))
    return float(value), gx[:, -2] / gx[:, -1], seconds, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the first 200 quarters only")
    p.add_argument("--gamma", type=float, default=0.05)
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    fix_mmap_threshold()
    notes = read_musicxml_notes(_package_file("music21", "corpus", *PIECE))
    if args.quick:
        notes = [n for n in notes if n[0] < 200]
    t0 = time.perf_counter()
    x, to_s_x, end_beat = performance(notes, seed=1)
    y, to_s_y, _ = performance(notes, seed=2)
    t_synth = time.perf_counter() - t0
    NA, NB = len(x), len(y)
    print(f"{PIECE[1]} {PIECE[2]}: {len(notes)} notes, {NA} x {NB} frames ({NA / FPS:.0f} s and {NB / FPS:.0f} s "
          f"of audio at {FPS} frames/s); synthesis and features {t_synth:.0f} s")

    # the true alignment: frame i of x -> its beat -> the time of that beat in y
    beats = np.linspace(0, end_beat, 20001)
    t_x = np.arange(NA) / FPS
    true_t_y = to_s_y(np.interp(t_x, to_s_x(beats), beats))

    value, seconds_value, peak_value, _ = measured(lambda: float(sm.dtw_features(x, y, gamma=args.gamma)))
    rows, payload = [], {"NA": NA, "NB": NB, "fps": FPS, "gamma": args.gamma, "piece": "/".join(PIECE),
                         "value_seconds": seconds_value, "value_peak_bytes": peak_value, "runs": []}
    curves = {}
    for reg, gamma in (("negentropy", args.gamma), ("hard", 1.0)):
        v, j_of_i, seconds, peak = aligned_frames(x, y, reg, gamma)
        err = np.abs(j_of_i / FPS - true_t_y)
        curves[reg] = j_of_i / FPS
        label = f"soft-DTW (γ = {gamma:g})" if reg == "negentropy" else "hard DTW"
        rows.append([label, f"{v:.2f}", f"{err.mean():.3f}", f"{np.median(err):.3f}", f"{np.percentile(err, 95):.3f}",
                     f"{seconds:.1f}", f"{peak / 2 ** 20:.1f}"])
        payload["runs"].append({"reg": reg, "gamma": gamma, "value": v, "mad_s": float(err.mean()),
                                "median_s": float(np.median(err)), "p95_s": float(np.percentile(err, 95)),
                                "grad_seconds": seconds, "grad_peak_bytes": peak})
    matrix_gb = 4 * 8 * NA * NB / 1e9
    md = [f"## Long alignment: two renderings of Beethoven op. 59 no. 3, i ({NA} × {NB} frames)", "",
          markdown_table(["Alignment", "DTW value", "MAD (s)", "median (s)", "95th pct (s)",
                          "value + gradient time (s)", "peak MiB"], rows), "",
          f"Features: unit-norm chroma at {FPS} frames/s (d = 12, plus the 2 auxiliary columns that read "
          f"the alignment off the gradient); squared Euclidean cost. The value alone (soft-DTW) took "
          f"{seconds_value:.1f} s and {peak_value / 2 ** 20:.1f} MiB. One thread, float64; peak = growth of "
          f"the resident set's high-water mark during the call. The cost-matrix path would need about "
          f"{matrix_gb:.0f} GB (θ, E and two weights per cell in float64). One frame is "
          f"{1 / FPS * 1000:.0f} ms."]
    json_path, md_path = write_results("long_alignment", payload, "\n".join(md), mode)
    plot(t_x, true_t_y, curves, figure_path("long_alignment", mode), args.gamma)
    print("\n".join(md))
    print("wrote", json_path, md_path)


def plot(t_x, true_t_y, curves, path, gamma):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    a.plot(t_x, true_t_y, color="k", lw=2.5, label="true alignment")
    a.plot(t_x, curves["negentropy"], color="C0", lw=1, label=f"soft-DTW, expected (γ = {gamma:g})")
    a.plot(t_x, curves["hard"], color="C3", lw=1, ls="--", label="hard DTW")
    a.set_xlabel("rendering x (s)")
    a.set_ylabel("rendering y (s)")
    a.set_title(f"alignment of {len(t_x)} frames with the other rendering")
    a.legend(loc="upper left")
    for reg, color in (("negentropy", "C0"), ("hard", "C3")):
        b.plot(t_x, curves[reg] - true_t_y, color=color, lw=0.8,
               label="soft-DTW" if reg == "negentropy" else "hard DTW")
    b.axhline(0, color="k", lw=0.5)
    b.set_xlabel("rendering x (s)")
    b.set_ylabel("aligned time − true time (s)")
    b.set_title("alignment error")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
