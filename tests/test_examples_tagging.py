"""The span decoder of examples/tagging.py against independent readings of the schemes."""
import itertools
import os
import random
import sys

import pytest

pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import tagging  # noqa: E402


def bio_entities(tags):
    """Brute oracle for a well-formed BIO sequence: an entity is B-X followed by the longest run of I-X."""
    out = set()
    for i, t in enumerate(tags):
        if t.startswith("B-"):
            j = i
            while j + 1 < len(tags) and tags[j + 1] == "I-" + t[2:]:
                j += 1
            out.add((i, j, t[2:]))
    return out


def biose_to_bio(tags):
    """BIOSE -> BIO (S-X -> B-X, E-X -> I-X): the same entities in a well-formed sequence."""
    return [{"S": "B", "E": "I"}.get(t[0], t[0]) + t[1:] for t in tags]


def well_formed_bio(n, types=("X", "Y")):
    """Every well-formed BIO sequence of length n (no I-X unless after B-X / I-X)."""
    tags = ["O"] + [p + "-" + k for k in types for p in "BI"]
    for seq in itertools.product(tags, repeat=n):
        if all(t[0] != "I" or (i and seq[i - 1] != "O" and seq[i - 1][2:] == t[2:]) for i, t in enumerate(seq)):
            yield list(seq)


def bio_to_biose(tags):
    """Well-formed BIO -> BIOSE: a one-token entity is S-X, the last token of a longer one E-X."""
    out = []
    for i, t in enumerate(tags):
        nxt = tags[i + 1] if i + 1 < len(tags) else "O"
        last = nxt != "I-" + t[2:]
        if t[0] == "B":
            out.append(("S-" if last else "B-") + t[2:])
        elif t[0] == "I":
            out.append(("E-" if last else "I-") + t[2:])
        else:
            out.append(t)
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_bio_and_biose_give_the_same_entities_as_the_brute_reading(n):
    for bio in well_formed_bio(n):
        expected = bio_entities(bio)
        assert tagging.spans(bio) == expected, bio
        biose = bio_to_biose(bio)
        assert bio_entities(biose_to_bio(biose)) == expected  # the oracle's own round trip
        assert tagging.spans(biose) == expected, biose
        # BILOU (L, U) and the letter after the type: the same entities
        bilou = [{"E": "L", "S": "U"}.get(t[0], t[0]) + t[1:] for t in biose]
        assert tagging.spans(bilou) == expected, bilou
        suffix = [t if t == "O" else t[2:] + "-" + t[0] for t in biose]
        assert tagging.spans(suffix) == expected, suffix


def test_hand_checked_examples():
    assert tagging.spans(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 1, "PER"), (3, 3, "LOC")}
    assert tagging.spans(["S-PER", "B-ORG", "I-ORG", "E-ORG", "O"]) == {(0, 0, "PER"), (1, 3, "ORG")}
    assert tagging.spans(["B-PER", "B-PER"]) == {(0, 0, "PER"), (1, 1, "PER")}
    assert tagging.spans(["O", "I-PER", "I-PER"]) == {(1, 2, "PER")}  # IOB1 / conlleval reading
    assert tagging.spans(["B-PER", "I-LOC"]) == {(0, 0, "PER"), (1, 1, "LOC")}
    assert tagging.spans(["B-person", "I-person", "O", "B-geo-loc"]) == {(0, 1, "person"), (3, 3, "geo-loc")}
    assert tagging.spans(["O", "O"]) == set()
    assert tagging.spans([]) == set()


def test_any_sequence_matches_seqeval_default_mode():
    """Ill-formed sequences too: the conlleval rule as seqeval implements it (pip install seqeval)."""
    seqeval = pytest.importorskip("seqeval.metrics.sequence_labeling",
                                  reason="seqeval is in the peers extra (pip install seqeval)")
    tags = ["O"] + [p + "-" + k for k in ("X", "Y") for p in "BIES"]
    for n in range(1, 5):
        for seq in itertools.product(tags, repeat=n):
            expected = {(s, e, k) for k, s, e in seqeval.get_entities(list(seq))}
            assert tagging.spans(list(seq)) == expected, seq
    rng = random.Random(0)
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randint(5, 30))]
        assert tagging.spans(seq) == {(s, e, k) for k, s, e in seqeval.get_entities(seq)}, seq


def test_seed_stats_mean_and_sample_std():
    import statistics
    values = [57.3, 55.1, 58.0]
    mean, spread = tagging.seed_stats(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert spread == pytest.approx(statistics.stdev(values))
    assert tagging.seed_stats([3.0]) == (3.0, 0.0)


def test_relaxed_l2_gradient_vanishes_where_marginals_are_one_hot():
    """Why the relaxed ℓ2 loss needs a warm start: with one-hot ℓ2 marginals the gradient is exactly 0.

    ∇Vit_Ω is locally constant where the marginals are one-hot (the ℓ2 max is a
    projection onto the simplex, constant on an open set around a vertex), so
    Δ(Y, ∇Vit_Ω(θ)) has zero gradient there even when the target tag is wrong;
    the surrogate's gradient ∇Vit_Ω(θ) − Y is not zero. A larger γ opens the support.
    """
    import torch
    import smoothmax.torch as smt

    torch.manual_seed(0)
    S, T = 4, 5
    emissions = torch.zeros(1, T, S, dtype=torch.float64)
    emissions[..., 0] = 3.0  # every token: tag 0 by a margin of 3
    target = torch.full((1, T), 2)  # the gold tag is another one
    onehot = torch.nn.functional.one_hot(target, S).to(emissions.dtype)
    grads = {}
    for gamma in (1.0, 10.0):
        crf = smt.CRF(S, batch_first=True, reg="l2", gamma=gamma).double()
        for p in crf.parameters():
            torch.nn.init.zeros_(p)
        x = emissions.clone().requires_grad_(True)
        marg = crf.marginals(x)
        ((marg - onehot) ** 2).sum().backward()
        grads[gamma] = (marg.detach(), x.grad.clone())
        x.grad = None
        (-crf(x, target, reduction="sum")).backward()
        assert x.grad.abs().max() > 0.1  # the surrogate still pushes towards the target
    marg, grad = grads[1.0]
    assert torch.equal(marg[..., 0], torch.ones_like(marg[..., 0]))  # one-hot on tag 0
    assert torch.equal(grad, torch.zeros_like(grad))  # exactly zero: training stops
    marg, grad = grads[10.0]
    assert (marg[..., 2] > 0).all()  # γ = 10: the target is in the support
    assert grad[..., 2].max() < 0  # and the gradient raises its score


def test_selection_continues_the_best_grid_point_and_restores_its_best_epoch():
    rng = random.Random(0)
    sents = []
    for _ in range(40):
        toks = [rng.choice(["a", "b", "c", "x", "y"]) for _ in range(rng.randint(2, 6))]
        labels = ["B-X" if t == "x" else "I-X" if t == "y" and i and toks[i - 1] == "x" else "O"
                  for i, t in enumerate(toks)]
        sents.append((toks, labels))
    words = tagging.Vocab(w for s in sents for w in s[0])
    chars = tagging.Vocab(c for s in sents for w in s[0] for c in w)
    tags = tagging.Vocab((t for s in sents for t in s[1]), specials=())
    enc = tagging.encode(sents, words, chars, tags)
    data = {"train": enc[:30], "dev": enc[30:], "test": enc[30:], "is_ner": True, "tags": tags}
    grid = [{"optimizer": "adam", "lr": 1e-4, "gamma": 1.0, "warm": 0},
            {"optimizer": "adam", "lr": 3e-2, "gamma": 1.0, "warm": 0},
            {"optimizer": "sgd", "lr": 1e-3, "gamma": 1.0, "warm": 0}]
    bar = tagging.tqdm(total=0, disable=True)
    model, run, selection = tagging.select_and_train(data, (words, chars, tags), "surrogate", "negentropy",
                                                     grid, epochs=4, select_epochs=2, seed=0, batch_size=8,
                                                     bar=bar)
    scores = [x["dev"] for x in selection]
    assert [x["hp"] for x in selection] == grid
    assert run["hp"] == grid[scores.index(max(scores))]
    assert len(run["history"]) == 4
    best = max(h["f1"] for h in run["history"])
    assert tagging.evaluate(model, data["dev"], tags.itos)["f1"] == pytest.approx(best)
    # the selected point trains as if alone (its own dropout and batch-order streams)
    alone = tagging.train_epochs(tagging.new_run(data, (words, chars, tags), "negentropy", run["hp"], 0), data,
                                 "surrogate", 4, 8, bar)
    assert [h["train_loss"] for h in alone["history"]] == [h["train_loss"] for h in run["history"]]
    # the record holds the scores compared after the selection epochs, the winner's too (here
    # the winner, Adam 1e-2, scores higher on dev after its third epoch than after two)
    grid = [dict(grid[0], lr=1e-4), dict(grid[0], lr=1e-2)]
    _, run, selection = tagging.select_and_train(data, (words, chars, tags), "surrogate", "negentropy", grid,
                                                 epochs=4, select_epochs=2, seed=0, batch_size=8, bar=bar)
    assert run["hp"] == grid[1] and max(h["f1"] for h in run["history"]) > max(h["f1"] for h in run["history"][:2])
    assert [x["dev"] for x in selection] == [selection[0]["dev"], max(h["f1"] for h in run["history"][:2])]


def test_relaxed_l2_grid_points_train_as_many_epochs_before_the_comparison(monkeypatch):
    import argparse
    args = argparse.Namespace(optimizer=None, lr=None, gamma=None, warm=None, mix=None, decay=None,
                              no_select=False)
    shipped = tagging.row_grid("relaxed", "l2", args, 10)
    # a warm start with the surrogate's weight 1 or 0.5, or the surrogate mixed in from the start
    assert [(hp["warm"], hp["mix"]) for hp in shipped] == [(1, 1.0), (1, 0.5), (0, 0.5)]
    assert tagging.select_epochs_of(shipped, "relaxed", 2, 10) == 2
    hp = {"optimizer": "adam", "lr": 1e-2, "gamma": 3.0}
    monkeypatch.setitem(tagging.SELECT_GRID, ("relaxed", "l2"), [dict(hp, warm=1), dict(hp, warm=5)])
    for epochs in (4, 6, 10):
        grid = tagging.row_grid("relaxed", "l2", args, epochs)
        warm = min(5, epochs - 1)  # at least one epoch of the relaxed loss
        assert [hp["warm"] for hp in grid] == [1, warm]
        # the longest warm start decides, for every point: warm + 1 epochs (one of the relaxed loss)
        assert tagging.select_epochs_of(grid, "relaxed", 2, epochs) == min(max(2, warm + 1), epochs)
    assert tagging.select_epochs_of(tagging.row_grid("surrogate", "l2", args, 10), "surrogate", 2, 10) == 2
    fixed = argparse.Namespace(optimizer=None, lr=None, gamma=None, warm=2, mix=0.5, decay=None,
                               no_select=False)
    assert [(hp["warm"], hp.get("mix")) for hp in tagging.row_grid("surrogate", "l2", fixed, 10)] == [(0, None)]
    assert [(hp["warm"], hp.get("mix")) for hp in tagging.row_grid("relaxed", "l2", fixed, 10)] == [(2, 0.5)]
    trained = []

    def record(run, data, loss, n, *a, **k):
        trained.append((run["hp"]["warm"], n))
        run["history"] += [{"f1": 0.0}] * n
        run["best"], run["best_state"] = 0.0, run["model"].state_dict()
        return run
    monkeypatch.setattr(tagging, "train_epochs", record)
    monkeypatch.setattr(tagging, "new_run", lambda data, vocabs, reg, hp, seed: {
        "hp": hp, "history": [], "best": -1.0, "model": tagging.torch.nn.Linear(1, 1)})
    grid = tagging.row_grid("relaxed", "l2", args, 10)
    tagging.select_and_train(None, None, "relaxed", "l2", grid, epochs=10, select_epochs=2, seed=0,
                             batch_size=8, bar=None)
    assert trained[:2] == [(1, 6), (5, 6)] and trained[2] == (1, 4)  # the first of equals goes on


def twelve_sentences(seed):
    """A tiny NER corpus (8 train, 4 dev/test sentences) and its vocabularies."""
    rng = random.Random(seed)
    sents = [([rng.choice("abxy") for _ in range(4)], ["O", "B-X", "I-X", "O"]) for _ in range(12)]
    words = tagging.Vocab(w for s in sents for w in s[0])
    chars = tagging.Vocab(c for s in sents for w in s[0] for c in w)
    tags = tagging.Vocab((t for s in sents for t in s[1]), specials=())
    enc = tagging.encode(sents, words, chars, tags)
    data = {"train": enc[:8], "dev": enc[8:], "test": enc[8:], "is_ner": True, "tags": tags}
    return data, (words, chars, tags)


def test_a_relaxed_row_keeps_its_best_epoch_of_the_relaxed_loss_not_of_its_warm_start(monkeypatch):
    data, (words, chars, tags) = twelve_sentences(2)
    scores = iter([90.0, 10.0, 30.0, 20.0])  # the warm-start epoch scores best on dev
    monkeypatch.setattr(tagging, "evaluate", lambda model, d, itos: {"f1": next(scores)})
    hp = {"optimizer": "adam", "lr": 1e-2, "gamma": 1.0, "warm": 1}
    run = tagging.new_run(data, (words, chars, tags), "l2", hp, 0)
    tagging.train_epochs(run, data, "relaxed", 4, 4, tagging.tqdm(total=0, disable=True))
    assert [h["loss"] for h in run["history"]] == ["surrogate", "relaxed", "relaxed", "relaxed"]
    assert run["best"] == 30.0  # epoch 3, the best of the relaxed epochs


@pytest.mark.parametrize("decay", ["plateau", "none"])
def test_plateau_halves_the_rate_after_each_epoch_of_the_rows_loss_that_is_not_a_new_best(monkeypatch, decay):
    data, (words, chars, tags) = twelve_sentences(3)
    hp = {"optimizer": "adam", "lr": 1e-2, "gamma": 1.0, "warm": 1, "decay": decay}
    run = tagging.new_run(data, (words, chars, tags), "l2", hp, 0)
    # dev scores of the epochs; the warm-start epoch (90) must not count as the relaxed loss's best
    scores, used = iter([90.0, 10.0, 30.0, 20.0, 25.0, 40.0]), []

    def evaluate(model, d, itos):  # called after each epoch's updates: the rate that epoch used
        used.append(run["opt"].param_groups[0]["lr"])
        return {"f1": next(scores)}
    monkeypatch.setattr(tagging, "evaluate", evaluate)
    tagging.train_epochs(run, data, "relaxed", 6, 4, tagging.tqdm(total=0, disable=True))
    expected = [1e-2] * 4 + [5e-3, 2.5e-3] if decay == "plateau" else [1e-2] * 6
    assert used == pytest.approx(expected)
    assert run["best"] == 40.0


def test_gamma_schedule_runs_from_gamma_from_down_to_gamma_after_the_warm_start(monkeypatch):
    data, (words, chars, tags) = twelve_sentences(3)
    hp = {"optimizer": "adam", "lr": 1e-2, "gamma": 3.0, "warm": 1, "gamma_from": 12.0, "gamma_epochs": 2}
    run = tagging.new_run(data, (words, chars, tags), "l2", hp, 0)
    used = []

    def evaluate(model, d, itos):  # called after each epoch's updates: the γ that epoch used
        used.append(model.crf.gamma)
        return {"f1": 1.0}
    monkeypatch.setattr(tagging, "evaluate", evaluate)
    tagging.train_epochs(run, data, "relaxed", 5, 4, tagging.tqdm(total=0, disable=True))
    # warm-start epoch at γ; then 12·(3/12)^(k/2) for k = 0, 1; then γ
    assert used == pytest.approx([3.0, 12.0, 6.0, 3.0, 3.0])
    assert run["model"].crf.gamma == 3.0


def test_every_grid_point_gets_the_plateau_schedule_unless_the_command_line_fixes_it():
    import argparse
    args = argparse.Namespace(optimizer=None, lr=None, gamma=None, warm=None, mix=None, decay=None,
                              no_select=False)
    for loss, reg in tagging.CONFIGS:
        assert {hp["decay"] for hp in tagging.row_grid(loss, reg, args, 10)} == {"plateau"}
    args.decay = "none"
    assert [hp["decay"] for hp in tagging.row_grid("surrogate", "l2", args, 10)] == ["none"]


def test_render_reports_mean_and_std_over_seeds():
    import statistics
    f1 = [50.0, 53.0, 47.5]
    hp = {"optimizer": "adam", "lr": 1e-2, "gamma": 1.0, "warm": 0}
    results = [{"task": "tweets.tsv", "loss": "surrogate", "reg": "negentropy", "seed": k, **hp, "seconds": 1.0,
                "selection": [{"hp": hp, "dev": 60.0}, {"hp": dict(hp, lr=3e-3), "dev": 55.0}] if k == 0 else
                [{"hp": hp, "dev": 61.0}],
                "test": {"f1": v, "precision": v, "recall": v, "accuracy": 90.0}} for k, v in enumerate(f1)]
    payload = {"columns": ["tweets.tsv"], "results": results, "sparse_examples": {}, "args": {"batch_size": 16},
               "sizes": {"tweets.tsv": {"train": 10, "dev": 5, "test": 5, "epochs": 4, "metric": "f1"}}}
    md = tagging.render(payload, "full")
    cell = f"{statistics.mean(f1):.2f} ± {statistics.stdev(f1):.2f}"
    assert f"| Negentropy, surrogate (CRF) | {cell} |" in md  # F1 of a NER file whatever its name
    assert "adam 0.003, γ 1: 55.0" in md
    assert "Assembled from" not in md
    assert "Assembled from two runs." in tagging.render(dict(payload, note="Assembled from two runs."), "full")


def toy_tsv(tmp_path, rng, n, words, longest):
    """A token<TAB>tag file of ``n`` random sentences: x is B-X, a y after x is I-X, the rest O."""
    lines = []
    for _ in range(n):
        toks = [rng.choice(words) for _ in range(rng.randint(2, longest))]
        for i, t in enumerate(toks):
            lines.append(f"{t}\t" + ("B-X" if t == "x" else "I-X" if t == "y" and i and toks[i - 1] == "x" else "O"))
        lines.append("")
    corpus = tmp_path / "toy.tsv"
    corpus.write_text("\n".join(lines) + "\n")
    return corpus


def test_resume_skips_finished_rows_and_reports_the_same_results(tmp_path, monkeypatch):
    import json
    import _common
    corpus = toy_tsv(tmp_path, random.Random(1), 60, "abcxy", 6)
    monkeypatch.setattr(_common, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(tagging, "PARTIAL", str(tmp_path / "partial"))
    argv = ["--tsv", str(corpus), "--epochs", "2", "--select-epochs", "1", "--seeds", "2",
            "--configs", "surrogate:negentropy", "relaxed:l2", "--resume"]
    tagging.main(argv)
    kept = sorted(p.name for p in (tmp_path / "partial").iterdir())
    assert len([k for k in kept if k.endswith(".json")]) == 4  # 2 rows x 2 seeds
    first = json.loads((tmp_path / "results" / "tagging_toy.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished (row, seed) was trained again")
    monkeypatch.setattr(tagging, "select_and_train", no_training)
    tagging.main(argv)
    again = json.loads((tmp_path / "results" / "tagging_toy.json").read_text())
    assert [(r["loss"], r["reg"], r["seed"], r["test"]) for r in again["results"]] == \
        [(r["loss"], r["reg"], r["seed"], r["test"]) for r in first["results"]]
    # one (row, seed) removed: only it is trained again, with the first seed's parameters
    os.remove(tmp_path / "partial" / [k for k in kept if k.endswith("relaxed_l2_seed1.json")][0])
    calls = []
    monkeypatch.setattr(tagging, "select_and_train",
                        lambda data, vocabs, loss, reg, grid, *a, **k: calls.append((loss, reg, grid)) or
                        no_training())
    with pytest.raises(AssertionError):
        tagging.main(argv)
    relaxed = next(r for r in first["results"] if r["loss"] == "relaxed" and r["seed"] == 0)
    assert [(c[0], c[1]) for c in calls] == [("relaxed", "l2")]
    assert all(calls[0][2][0][h] == relaxed[h] for h in calls[0][2][0])
    # kept with other settings (here the schedule): trained again, not resumed
    calls.clear()
    with pytest.raises(AssertionError):
        tagging.main(argv + ["--decay", "none"])
    assert [(c[0], c[1]) for c in calls] == [("surrogate", "negentropy")]
    calls.clear()  # or another evaluation rule (kept without averaging, asked with it)
    with pytest.raises(AssertionError):
        tagging.main(argv + ["--average", "ema"])
    assert [(c[0], c[1]) for c in calls] == [("surrogate", "negentropy")]
    # the first seed kept from a selection over another grid: selected again, even though
    # its settings are still a point of the new grid
    chosen = {h: relaxed[h] for h in ("optimizer", "lr", "gamma", "warm", "mix") if h in relaxed}
    monkeypatch.setitem(tagging.SELECT_GRID, ("relaxed", "l2"), [chosen, dict(chosen, gamma=7.0)])
    calls.clear()
    with pytest.raises(AssertionError):
        tagging.main(argv)
    assert [(c[0], c[1], len(c[2])) for c in calls] == [("relaxed", "l2", 2)]


def test_update_reruns_only_the_given_rows_and_keeps_the_others(tmp_path, monkeypatch):
    import json
    import _common
    corpus = toy_tsv(tmp_path, random.Random(3), 50, "abxy", 5)
    monkeypatch.setattr(_common, "RESULTS", str(tmp_path / "results"))
    common = ["--tsv", str(corpus), "--epochs", "2", "--select-epochs", "1", "--seeds", "2"]
    tagging.main(common + ["--configs", "surrogate:negentropy", "relaxed:l2", "surrogate:hard"])
    first = json.loads((tmp_path / "results" / "tagging_toy.json").read_text())
    with pytest.raises(SystemExit):  # nothing to update in another mode
        tagging.main(common + ["--quick", "--configs", "relaxed:l2", "--update"])
    tagging.main(common + ["--configs", "relaxed:l2", "--mix", "0.2", "--update"])
    after = json.loads((tmp_path / "results" / "tagging_toy.json").read_text())
    rows = [(r["loss"], r["reg"], r["seed"]) for r in after["results"]]
    assert rows == [(r["loss"], r["reg"], r["seed"]) for r in first["results"]]  # the same rows, in order
    for old, new in zip(first["results"], after["results"]):
        if old["loss"] == "relaxed":  # rerun with the new setting
            assert new["mix"] == 0.2 and old.get("mix") != 0.2
        else:  # kept as they were
            assert new == old
    assert after["earlier_runs"] == [first["meta"]]
    md = (tmp_path / "results" / "tagging_toy.md").read_text()
    assert first["meta"]["command"] in md and "mix 0.2" in md


def test_the_surrogate_term_keeps_the_relaxed_l2_gradient_alive_where_marginals_are_one_hot():
    """``mix``: the relaxed ℓ2 loss plus a small surrogate term trains from a collapsed start."""
    import types
    import torch
    import smoothmax.torch as smt

    S, T = 4, 5
    emissions = torch.zeros(1, T, S, dtype=torch.float64)
    emissions[..., 0] = 3.0  # every token: tag 0 by a margin of 3, one-hot ℓ2 marginals
    target = torch.full((1, T), 2)
    lengths = torch.tensor([T])
    model = types.SimpleNamespace(crf=smt.CRF(S, batch_first=True, reg="l2", gamma=1.0).double())
    for p in model.crf.parameters():
        torch.nn.init.zeros_(p)
    grads = {}
    for mix in (0.0, 0.1):
        x = emissions.clone().requires_grad_(True)
        tagging.loss_fn(model, x, target, lengths, "relaxed", mix=mix).backward()
        grads[mix] = x.grad
    assert torch.equal(grads[0.0], torch.zeros_like(grads[0.0]))  # the relaxed loss alone: stuck
    assert (grads[0.1][..., 2] < 0).all() and (grads[0.1][..., 0] > 0).all()  # raises the gold tag, lowers tag 0


def test_ema_average_is_the_weighted_mean_of_the_iterates_and_training_is_unchanged(monkeypatch):
    """``average: ema``: dev scores and the kept model use the average of the iterates; ``none``: the last one.

    The iterates themselves are the same (no plateau schedule here: it would read the average's dev score).
    """
    import torch
    data, (words, chars, tags) = twelve_sentences(4)
    hp = {"optimizer": "adam", "lr": 3e-2, "gamma": 1.0, "warm": 0}
    runs = {}
    for average in ("none", "ema"):
        run = tagging.new_run(data, (words, chars, tags), "negentropy", dict(hp, average=average), 0)
        iterates, seen, step = [], [], run["opt"].step

        def recorded_step(*a, step=step, iterates=iterates, model=run["model"], **k):
            out = step(*a, **k)
            iterates.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return out
        run["opt"].step = recorded_step
        scores = iter([10.0, 30.0, 20.0])  # epoch 2 is the best on dev

        def evaluate(model, d, itos, seen=seen):  # the parameters each epoch is evaluated with
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return {"f1": next(scores)}
        monkeypatch.setattr(tagging, "evaluate", evaluate)
        tagging.train_epochs(run, data, "surrogate", 3, 2, tagging.tqdm(total=0, disable=True))
        runs[average] = run, iterates, seen
    (plain, it0, seen0), (ema, it1, seen1) = runs["none"], runs["ema"]
    assert len(it1) == 12  # 8 sentences in batches of 2: 4 steps an epoch, 3 epochs
    for a, b in zip(it0, it1):  # the same training: the same iterates, step by step
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert [h["train_loss"] for h in plain["history"]] == [h["train_loss"] for h in ema["history"]]
    assert all(torch.equal(p, it1[-1][n]) for n, p in ema["model"].named_parameters())  # goes on from the last
    d = 1 - 1 / 4  # a horizon of one epoch
    for epoch, (last, avg) in enumerate(zip(seen0, seen1)):
        k = 4 * (epoch + 1)
        assert all(torch.equal(last[n], it0[k - 1][n]) for n in last)  # none: the last iterate, as before
        w = [d ** (k - i) for i in range(1, k + 1)]
        for n in avg:  # ema: sum_i d^(k-i) p_i / sum_i d^(k-i), computed here from the iterates
            expected = sum(wi * it1[i][n].double() for i, wi in enumerate(w)) / sum(w)
            torch.testing.assert_close(avg[n].double(), expected, rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(avg[n], it1[k - 1][n]) for n in avg)  # not the last iterate
    for n, p in seen1[1].items():  # the kept model: the average at the best dev epoch (2)
        assert torch.equal(ema["best_state"][n], p)
        assert torch.equal(plain["best_state"][n], it0[7][n])


def test_average_none_leaves_the_grid_as_before_and_ema_applies_to_every_point():
    import argparse
    args = argparse.Namespace(optimizer=None, lr=None, gamma=None, warm=None, mix=None, decay=None,
                              no_select=False)
    for loss, reg in tagging.CONFIGS:
        before = tagging.row_grid(loss, reg, args, 10)
        assert all("average" not in hp for hp in before)
        assert tagging.row_grid(loss, reg, argparse.Namespace(**vars(args), average="none"), 10) == before
        ema = tagging.row_grid(loss, reg, argparse.Namespace(**vars(args), average="ema"), 10)
        assert ema == [dict(hp, average="ema") for hp in before]  # still a selection over the grid
    assert "ema average" in tagging.fmt_hp(ema[0]) and "average" not in tagging.fmt_hp(before[0])
