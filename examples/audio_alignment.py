"""Supervised audio-to-score alignment through ∇DTW_Ω: the paper's §4.3 (Table 2).

Data. Bach chorales from music21's corpus (MusicXML, read without importing
music21) are rendered to audio by a small additive synthesizer (harmonic
partials with a decaying envelope, a random timbre per piece, noise) under a
random, smooth tempo curve: the tempo curve is the ground-truth alignment.
Audio frames become log-frequency (semitone-band) spectra ``a_i``; the score
becomes events ``b_j`` (the pitch classes sounding between two consecutive
onsets), a distribution over the 12 pitch classes.

Model (paper eq. 4.3, with a pitch-class distribution in place of one key):
a linear multinomial classifier ``l_i = −log softmax(W a_i + c)`` over the 12
pitch classes and ``θ[i, j] = <l_i, b_j>``. End to end, θ is trained through
``E = ∇DTW_Ω(θ)`` (negentropy) with the relaxed area loss
``Δ(Y, E) = ||L (E − Y)ᵀ||²_F`` (L lower-triangular ones; Garreau et al. 2014);
its gradient runs the HVP pass of ``smoothmax``. Test alignments are hard DTW
paths (``smoothmax.dtw_path``) on the learned θ.

Baselines: the same classifier pre-trained frame by frame (cross-entropy
against the ground-truth event of each frame) and a random θ. Metric: mean
absolute deviation (seconds) between the predicted and true audio onsets of
the score events, on training and on held-out pieces. Finally the models are
applied to a *real* performance, Mozart K.265 variation 1 played on a piano
(shipped by parangonar with its note alignment), rendered by the same
synthesizer from the performed MIDI notes.

    python examples/audio_alignment.py --quick   # 8 train / 6 test chorales
    python examples/audio_alignment.py           # 40 / 20
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import figure_path, limit_threads, markdown_table, tqdm, write_results  # noqa: E402
from _data import bach_chorales, mozart_match, read_match, read_musicxml_notes  # noqa: E402

import torch  # noqa: E402

import smoothmax as sm  # noqa: E402

SR = 8000          # Hz
HOP = 400          # 50 ms frames
WIN = 2048
LOW, HIGH = 36, 96  # semitone bands C2..B6


# ---------------------------------------------------------------- audio

def synthesize(notes, sr=SR, rng=None):
    """Additive synthesis of ``notes`` rows ``(onset_s, offset_s, midi, velocity)``."""
    rng = rng or np.random.default_rng(0)
    n_harm = 6
    timbre = rng.uniform(0.2, 1.0, n_harm) / np.arange(1, n_harm + 1) ** rng.uniform(0.5, 1.5)
    end = max(n[1] for n in notes) + 0.5
    audio = np.zeros(int(end * sr) + 1)
    for onset, offset, midi, vel in notes:
        s, e = int(onset * sr), int(min(offset + 0.05, end) * sr)
        t = np.arange(e - s) / sr
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        env = np.exp(-2.5 * t) * np.minimum(1.0, t / 0.01) * np.minimum(1.0, (t[-1] - t + 1e-3) / 0.02)
        partials = sum(timbre[k] * np.sin(2 * np.pi * (k + 1) * f0 * t) for k in range(n_harm)
                       if (k + 1) * f0 < sr / 2)
        audio[s:e] += (vel / 127.0) * env * partials
    audio += 0.01 * rng.standard_normal(audio.shape) * np.abs(audio).max()
    return audio / (np.abs(audio).max() + 1e-9)


def features(audio, sr=SR):
    """Log semitone-band spectra, one row per frame (hop 50 ms), mean-centred per frame."""
    window = np.hanning(WIN)
    n_frames = 1 + max(0, (len(audio) - WIN)) // HOP
    pad = np.pad(audio, (WIN // 2, WIN // 2))
    idx = np.arange(WIN)[None, :] + HOP * np.arange(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(pad[idx] * window, axis=1)) ** 2
    freqs = np.fft.rfftfreq(WIN, 1 / sr)
    midi = 69 + 12 * np.log2(np.maximum(freqs, 1e-3) / 440.0)
    band = np.round(midi).astype(int)
    F = np.zeros((n_frames, HIGH - LOW))
    for k in range(LOW, HIGH):
        sel = band == k
        if sel.any():
            F[:, k - LOW] = spec[:, sel].sum(1)
    F = np.log1p(100.0 * F / (F.max() + 1e-12))
    return F - F.mean(1, keepdims=True), HOP / sr


# ---------------------------------------------------------------- score and ground truth

def score_events(notes):
    """Events between consecutive onsets: ``starts, ends`` (beats) and pitch-class distributions (NB, 12)."""
    onsets = np.unique(np.round([n[0] for n in notes], 6))
    end = max(n[0] + n[1] for n in notes)
    starts, ends = onsets, np.append(onsets[1:], end)
    B = np.zeros((len(starts), 12))
    for onset, dur, midi in notes:
        active = (starts < onset + dur - 1e-6) & (ends > onset + 1e-6)
        B[active, int(midi) % 12] = 1.0
    B[B.sum(1) == 0] = 1.0  # silence: uniform
    return starts, ends, B / B.sum(1, keepdims=True)


def random_tempo(total_beats, rng, base_bpm=None, depth=0.35):
    """A smooth random tempo curve: seconds per beat on a beat grid, and score->time map."""
    base = 60.0 / (base_bpm or rng.uniform(70, 110))
    grid = np.arange(0, np.ceil(total_beats) + 2)
    log_tempo = np.cumsum(rng.normal(0, depth / 3, len(grid)))
    log_tempo = np.convolve(log_tempo - log_tempo.mean(), np.ones(3) / 3, mode="same")
    spb = base * np.exp(np.clip(log_tempo, -depth * 2, depth * 2))
    times = np.concatenate([[0.0], np.cumsum(spb)])[:len(grid)]
    return lambda beats: np.interp(beats, grid, times)


def ground_truth(event_times, n_frames, hop_s):
    """0/1 alignment (NA, NB): frame i goes with the event sounding at its time; a DTW path."""
    NB = len(event_times) - 1
    t = np.arange(n_frames) * hop_s  # frame i is centred at i * hop (features pad WIN/2)
    j_of_i = np.clip(np.searchsorted(event_times, t, side="right") - 1, 0, NB - 1)
    j_of_i[0] = 0
    j_of_i[-1] = NB - 1
    j_of_i = np.maximum.accumulate(j_of_i)
    Y = np.zeros((n_frames, NB))
    prev = 0
    for i, j in enumerate(j_of_i):
        Y[i, prev:j + 1] = 1.0  # skipped events are crossed horizontally: still a path
        prev = j
    return Y


def make_chorale(path, rng):
    notes = read_musicxml_notes(path)
    starts, ends, B = score_events(notes)
    beat_to_s = random_tempo(ends[-1], rng)
    perf = [(beat_to_s(on), beat_to_s(on + dur), midi, rng.integers(60, 100)) for on, dur, midi in notes]
    A, hop_s = features(synthesize(perf, rng=rng))
    event_times = np.append(beat_to_s(starts), beat_to_s(ends[-1]))
    Y = ground_truth(event_times, len(A), hop_s)
    return {"name": os.path.basename(path), "A": A, "B": B, "Y": Y, "onsets": event_times[:-1], "hop": hop_s}


def make_mozart(rng):
    pairs, perf = read_match(mozart_match())
    notes = [(on, off - on, pitch) for on, off, pitch, _, _ in pairs]
    starts, ends, B = score_events(notes)
    # true audio onset of each score event: mean performed onset of its notes
    onsets = np.array([pairs[np.isclose(pairs[:, 0], s), 3].mean() for s in starts])
    onsets = np.maximum.accumulate(onsets)
    A, hop_s = features(synthesize([tuple(p) for p in perf], rng=rng))
    event_times = np.append(onsets, perf[:, 1].max())
    Y = ground_truth(event_times, len(A), hop_s)
    return {"name": "Mozart K.265 var. 1 (real performance)", "A": A, "B": B, "Y": Y,
            "onsets": onsets, "hop": hop_s}


# ---------------------------------------------------------------- model, losses, metric

class Classifier(torch.nn.Module):
    def __init__(self, n_features, n_classes=12):
        super().__init__()
        self.linear = torch.nn.Linear(n_features, n_classes)

    def theta(self, A, B):
        """θ[i, j] = <−log softmax(W a_i + c), b_j>."""
        return -torch.log_softmax(self.linear(A), -1) @ B.T


def area_loss(E, Y):
    """||L (E − Y)ᵀ||²_F: squared cumulative differences along the score axis, per audio frame."""
    return (torch.cumsum(E - Y, dim=1) ** 2).sum()


def relaxed_loss(theta, Y, gamma):
    losses = getattr(sm, "losses", None)
    if losses is not None and hasattr(losses, "dtw_relaxed"):
        return losses.dtw_relaxed(theta, Y, reg="negentropy", gamma=gamma)
    _, E = sm.dtw_grad(theta, reg="negentropy", gamma=gamma)
    return area_loss(E, Y)


def onset_mad(theta, piece):
    """Mean absolute deviation (s) between predicted and true audio onsets of the score events."""
    _, Y = sm.dtw_path(theta.detach().double().numpy())
    first = np.argmax(Y > 0, axis=0)  # first frame aligned with each event
    pred = first * piece["hop"]
    return float(np.mean(np.abs(pred - piece["onsets"])))


def to_torch(piece):
    return {k: torch.as_tensor(piece[k], dtype=torch.float64) for k in ("A", "B", "Y")}


def pretrain(model, pieces, epochs, lr=0.05):
    """Frame-wise multinomial logistic regression on the ground-truth events (the baseline)."""
    A = torch.cat([p["A"] for p in pieces])
    target = torch.cat([(p["Y"] / p["Y"].sum(1, keepdim=True)) @ p["B"] for p in pieces])
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(target * torch.log_softmax(model.linear(A), -1)).sum(1).mean() \
            + 1e-4 * (model.linear.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def train_end_to_end(model, pieces, epochs, gamma, lr, bar, val=None, watch=None):
    """Adam on the area loss; with ``val`` pieces, keep the epoch (0 = the start) of least mean val MAD.

    ``watch`` pieces are only evaluated after every epoch (a diagnostic, never used to choose).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history, val_history, watched = [], [], []
    if val:
        val_history.append(float(np.mean(evaluate(model, val))))
        best = (val_history[0], 0, {k: v.clone() for k, v in model.state_dict().items()})
    for epoch in range(epochs):
        total = 0.0
        for k in np.random.default_rng(epoch).permutation(len(pieces)):
            p = pieces[k]
            theta = model.theta(p["A"], p["B"])
            loss = relaxed_loss(theta, p["Y"], gamma) / p["Y"].shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / len(pieces))
        bar.update(1)
        bar.set_postfix(area=f"{history[-1]:.2f}")
        if watch:
            watched.append(evaluate(model, watch))
        if val:
            val_history.append(float(np.mean(evaluate(model, val))))
            if val_history[-1] < best[0]:
                best = (val_history[-1], epoch + 1, {k: v.clone() for k, v in model.state_dict().items()})
    if not val:
        return history, val_history, epochs, watched
    model.load_state_dict(best[2])
    return history, val_history, best[1], watched


def evaluate(model, pieces):
    with torch.no_grad():
        return [onset_mad(model.theta(p["A"], p["B"]), p) for p in pieces]


def plot_alignments(piece, models, gamma, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        with torch.no_grad():
            theta = model.theta(piece["A"], piece["B"])
            _, E = sm.dtw_grad(theta, reg="negentropy", gamma=gamma)
            _, Yhat = sm.dtw_path(theta)
        ax.imshow(E.numpy().T, cmap="Greys", origin="lower", aspect="auto", vmin=0, vmax=1)
        yi, yj = np.nonzero(piece["Y"].numpy())
        ax.plot(yi, yj, color="C2", lw=1.2, label="ground truth")
        pi, pj = np.nonzero(Yhat.numpy())
        ax.plot(pi, pj, color="C3", lw=0.9, ls="--", label="hard DTW on θ")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("audio frame")
        ax.set_ylabel("score event")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{piece['name']}: ∇DTW (grey), hard path and truth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 training and 6 test chorales (about 2 min)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--n-val", type=int, default=None,
                        help="validation chorales that pick the learning rate and epoch (default 0: the first "
                             "--lr, last epoch); results go to audio_alignment_valN")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.001],
                        help="Adam learning rates; with validation chorales the one of least validation error is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    limit_threads(1)
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    n_train = args.n_train or (8 if args.quick else 40)
    n_test = args.n_test or (6 if args.quick else 20)
    n_val = args.n_val or 0
    epochs = args.epochs or (15 if args.quick else 40)
    rng = np.random.default_rng(args.seed)
    files = list(rng.permutation(bach_chorales()))
    chosen = files[:n_train + n_test]

    pieces = []
    for path in tqdm(chosen, desc="render chorales"):
        pieces.append(make_chorale(path, rng))
    train_np, test_np = pieces[:n_train], pieces[n_train:]
    try:
        mozart_np = make_mozart(rng)
    except Exception as exc:  # the real performance is optional
        print("no real performance:", exc)
        mozart_np = None
    # validation chorales come last: train, test and Mozart do not depend on --n-val
    val_np = [make_chorale(path, rng) for path in files[n_train + n_test:n_train + n_test + n_val]]
    train = [dict(p, **to_torch(p)) for p in train_np]
    test = [dict(p, **to_torch(p)) for p in test_np]
    val = [dict(p, **to_torch(p)) for p in val_np]
    mozart = dict(mozart_np, **to_torch(mozart_np)) if mozart_np else None
    D = train[0]["A"].shape[1]

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    random_model = Classifier(D).double()
    torch.nn.init.normal_(random_model.linear.weight, std=1.0)
    pre = pretrain(Classifier(D).double(), train, epochs=200)
    t_pre = time.perf_counter() - t0
    lrs = args.lr if val else args.lr[:1]
    bar = tqdm(total=epochs * len(lrs), desc="end-to-end ∇DTW training")
    t0 = time.perf_counter()
    runs = []
    for lr in lrs:
        model = Classifier(D).double()
        model.load_state_dict(pre.state_dict())  # fine-tune the pre-trained classifier end to end
        history, val_history, best_epoch, watched = train_end_to_end(model, train, epochs, args.gamma, lr, bar,
                                                                     val, watch=test)
        runs.append({"lr": lr, "model": model, "area_history": history, "val_mad_history": val_history,
                     "test_mad_per_epoch_diagnostic": watched,
                     "best_epoch": best_epoch, "best_val_mad": min(val_history) if val else None})
    bar.close()
    t_e2e = time.perf_counter() - t0
    chosen = min(runs, key=lambda r: r["best_val_mad"]) if val else runs[0]
    e2e, history, val_history, best_epoch, lr = (chosen["model"], chosen["area_history"],
                                                 chosen["val_mad_history"], chosen["best_epoch"], chosen["lr"])

    models = {"End-to-end trained": e2e, "Pretrained": pre, "Random θ": random_model}
    rows, payload_rows = [], []
    test_pre = evaluate(pre, test)
    for name, model in models.items():
        tr, te = evaluate(model, train), evaluate(model, test)
        real = evaluate(model, [mozart])[0] if mozart else float("nan")
        wins = "—" if model is pre else f"{sum(a < b for a, b in zip(te, test_pre))}/{len(te)}"
        rows.append([name, f"{np.mean(tr):.3f} ± {np.std(tr):.3f}", f"{np.mean(te):.3f} ± {np.std(te):.3f}",
                     f"{np.median(te):.3f}", wins, f"{real:.3f}"])
        payload_rows.append({"model": name, "train_mad": tr, "test_mad": te, "mozart_mad": real,
                             "train_pieces": [p["name"] for p in train], "test_pieces": [p["name"] for p in test]})
    md = ["## Audio-to-score alignment: mean absolute deviation of event onsets (seconds)", "",
          markdown_table(["Linear model", f"Train ({n_train} chorales)", f"Test ({n_test} chorales)",
                          "Test median", "test pieces better than pretrained",
                          "Real performance (Mozart K.265/1)"], rows), "",
          f"Synthesized Bach chorales under random tempo curves; θ from a linear multinomial classifier "
          f"over pitch classes; end-to-end: {epochs} epochs of Adam on the area loss through "
          f"∇DTW_negentropy (γ = {args.gamma:g}), started from the pre-trained classifier"
          + (f"; the learning rate (of {', '.join(f'{r:g}' for r in lrs)}) and the epoch are picked by "
             f"the mean onset error on {n_val} other, validation chorales: lr {lr:g}, epoch {best_epoch} "
             f"(0 is the pre-trained start; validation error "
             + ", ".join(f"lr {r['lr']:g}: {r['best_val_mad']:.3f} at epoch {r['best_epoch']}" for r in runs)
             + "). " if val else f", lr {lr:g}, last epoch. ")
          + f"The pre-trained classifier (L-BFGS, frame-wise cross-entropy) sees the training chorales only. "
          f"Pre-training {t_pre:.0f} s, end-to-end {t_e2e:.0f} s. "
          f"Hop {HOP / SR * 1000:.0f} ms: one frame of error is {HOP / SR:.2f} s."]
    per_epoch = np.array(chosen["test_mad_per_epoch_diagnostic"])  # (epochs, n_test)
    worst = int(np.argmax(per_epoch[-1] - np.array(test_pre)))
    md += ["", f"Diagnostic (test error after every epoch of the kept run, never used to choose): the mean "
           f"test error moves between {per_epoch.mean(1).min():.3f} and {per_epoch.mean(1).max():.3f} s and "
           f"the median between {np.median(per_epoch, 1).min():.3f} and {np.median(per_epoch, 1).max():.3f} s "
           f"over the epochs; the piece that the last epoch makes worst, {test[worst]['name']} "
           f"(pretrained {test_pre[worst]:.3f} s), moves between {per_epoch[:, worst].min():.3f} and "
           f"{per_epoch[:, worst].max():.3f} s."]
    payload = {"rows": payload_rows, "area_history": history, "val_mad_history": val_history,
               "best_epoch": best_epoch, "lr": lr, "val_pieces": [p["name"] for p in val],
               "lr_runs": [{k: v for k, v in r.items() if k != "model"} for r in runs], "args": vars(args)}
    stem = "audio_alignment" + (f"_val{n_val}" if val else "")
    json_path, md_path = write_results(stem, payload, "\n".join(md), mode)
    if not val:  # the gallery shows the default run's figures
        plot_alignments(test[0], models, args.gamma, figure_path(stem, mode))
        if mozart:
            plot_alignments(mozart, models, args.gamma, figure_path(stem + "_mozart", mode))
    print("\n".join(md))
    print("wrote", json_path, md_path)


if __name__ == "__main__":
    main()
