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
