"""MER-UniBench from the user's own copy: `--data mer-unibench:DIR[:SPLIT]`, and its metrics.

MER-UniBench is the benchmark OmniOPSD (arXiv 2606.15920) reports (an average of 84.19
against AffectGPT's 74.77). Its media are licence-gated: this project never ships them; it
reads one dataset directory in the layout the benchmark's public tools use:

    DIR/label*.npz        `{split}_corpus` dicts of name -> {"emo": ..., "val": ...}
                          (MER2023: neutral/angry/happy/sad/worried/surprise; MELD: ints 0-6 =
                          anger/joy/sadness/neutral/disgust/fear/surprise; IEMOCAP's 4-way
                          labels under `whole_corpus`; sentiment datasets: `val` in [-3, 3] or
                          [-1, 1] and no `emo`)
    DIR/video/NAME.*      each clip's video (a file PyAV decodes, or a directory of frames)
    DIR/audio/NAME.wav    its sound at 16 kHz (optional: without it, the video's own track)
    DIR/*.csv             subtitles: name, chinese, english

A row's prompt carries the English subtitle and asks for the emotion (or the sentiment); its
answer is the label; a rationale can be joined by name from the user's file (`--rationales
FILE`, JSONL or CSV of name + rationale: for example the clue descriptions the benchmark's
authors released), which OmniOPSD's recipe shows its teacher.

The label files are `np.savez` archives of Python dicts, that is pickles. They are read without
running code from the file: `load_labels` opens the archive itself and unpickles each array
with an unpickler that admits only what this layout holds (a numpy object array of dicts,
strings and numbers); any other object is refused with one message naming the file.

Metrics (`metrics`), as the benchmark's evaluation computes them:
  emotion    the hit rate: the gold label is among the emotion words of the answer, each word
             mapped to its class by `SYNONYMS` (below; lower case, punctuation stripped)
  sentiment  the weighted F1 and the accuracy of the sign: val < 0 negative, > 0 positive,
             0 excluded, as the benchmark does
  open set   F_s, the harmonic mean of the set-level precision and recall of the predicted
             emotion words against the gold ones, both mapped through the user's emotion-wheel
             file (`--emotion-wheel FILE`, JSON of word -> cluster) when it is given
"""
import csv
import io
import json
import os
import pickle
import re
import zipfile

import numpy as np

from data import DataError, Example

# The classes of the basic-emotion datasets and the words that name each (our map, documented
# here: an answer's word counts for the class it appears under)
SYNONYMS = {
    "neutral": ("neutral", "calm", "indifferent", "none", "normal", "neu"),
    "angry": ("angry", "anger", "mad", "furious", "annoyed", "irritated", "rage", "ang"),
    "happy": ("happy", "happiness", "joy", "joyful", "glad", "cheerful", "delighted", "excited",
              "hap", "exc"),
    "sad": ("sad", "sadness", "unhappy", "sorrow", "depressed", "upset", "grief"),
    "worried": ("worried", "worry", "anxious", "anxiety", "nervous", "concerned", "uneasy"),
    "surprise": ("surprise", "surprised", "astonished", "amazed", "shocked", "sur"),
    "disgust": ("disgust", "disgusted", "revulsion", "contempt", "dis"),
    "fear": ("fear", "afraid", "scared", "frightened", "terrified", "fea"),
}
WORD_CLASS = {w: c for c, words in SYNONYMS.items() for w in words}
MELD = ("angry", "happy", "sad", "neutral", "disgust", "fear", "surprise")  # its ints 0-6
SENTIMENT_WORDS = {"positive": 1, "negative": -1}
PREFIX = "mer-unibench:"
EMOTION_QUESTION = "Which emotion does the person in the clip show? Answer with one word."
SENTIMENT_QUESTION = "Is the sentiment of the person in the clip positive or negative?"

# what a label file's pickles may hold: numpy's object-array reconstruction, and containers of
# strings and numbers; anything else is refused, never called
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "dict"),
            ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
            ("collections", "OrderedDict")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not data")
        return super().find_class(module, name)


def load_labels(path: str) -> dict:
    """{array name: its value} of an `np.savez` file, object arrays unpickled safely."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                raw = io.BytesIO(z.read(member))
                version = np.lib.format.read_magic(raw)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(raw) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(raw))
                if dtype.hasobject:
                    value = _Unpickler(raw).load()
                else:
                    value = np.frombuffer(raw.read(), dtype=dtype).reshape(shape)
                out[member.removesuffix(".npy")] = value.item() if value.shape == () else value
    except (zipfile.BadZipFile, ValueError, EOFError, pickle.UnpicklingError, OSError) as e:
        raise DataError(f"{path}: not a MER-UniBench label file this project reads "
                        f"({type(e).__name__}: {str(e)[:120]}); it holds only numpy arrays of "
                        f"dicts, strings and numbers, and nothing in it is run") from None
    return out


def parse_spec(spec: str) -> tuple[str, str]:
    """(directory, split or '') of `mer-unibench:DIR[:SPLIT]`."""
    rest = spec[len(PREFIX):]
    if ":" in rest and not os.path.isdir(rest):
        rest, split = rest.rsplit(":", 1)
        return rest, split
    return rest, ""


def _find(dirname: str, pattern: str) -> list[str]:
    return sorted(n for n in os.listdir(dirname) if re.fullmatch(pattern, n)) \
        if os.path.isdir(dirname) else []


def _subtitles(root: str) -> dict:
    """name -> English subtitle, from the directory's subtitle CSV (name, chinese, english)."""
    out = {}
    for f in _find(root, r".*\.csv"):
        with open(os.path.join(root, f), encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and {"name", "english"} <= set(rows[0]):
            out.update({r["name"]: (r.get("english") or "").strip() for r in rows})
    return out


def label_of(entry, where: str) -> tuple[str, float | None]:
    """(answer, valence or None) of one label entry: an emotion class, or for a sentiment
    dataset 'positive' / 'negative' / 'neutral' from the sign of `val`."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: the label is {type(entry).__name__}, expected a dict")
    emo, val = entry.get("emo"), entry.get("val")
    val = None if val is None else float(val)
    if emo is None or (isinstance(emo, str) and not emo):
        if val is None:
            raise DataError(f"{where}: the label has neither 'emo' nor 'val'")
        return ("positive" if val > 0 else "negative" if val < 0 else "neutral"), val
    if isinstance(emo, (int, np.integer)) or (isinstance(emo, str) and emo.isdigit()):
        k = int(emo)
        if not 0 <= k < len(MELD):
            raise DataError(f"{where}: emotion index {k} is not one of MELD's 0-6")
        return MELD[k], val
    cls = WORD_CLASS.get(str(emo).strip().lower())
    return (cls or str(emo).strip().lower()), val


def load(spec: str, *, rationales: str = "", audio_in_video: bool = False) -> list[Example]:
    """The rows of `mer-unibench:DIR[:SPLIT]`, each with its subtitle in the prompt, its label
    as the answer, its video and audio/NAME.wav (not with `audio_in_video`: the video's own
    track is the same sound) and, with `rationales`, the rationale of its name."""
    root, split = parse_spec(spec)
    if not os.path.isdir(root):
        raise DataError(f"--data {spec}: {root} is not a directory")
    files = _find(root, r"label.*\.npz")
    if not files:
        raise DataError(f"{root}: no label*.npz file (the MER-UniBench layout)")
    labels_path = os.path.join(root, files[0])
    corpora = {k.removesuffix("_corpus"): v for k, v in load_labels(labels_path).items()
               if k.endswith("_corpus")}
    split = split or ("test" if "test" in corpora else "whole" if "whole" in corpora
                      else next(iter(corpora), ""))
    if split not in corpora:
        raise DataError(f"{labels_path}: no split {split!r} (it has "
                        f"{', '.join(sorted(corpora)) or 'none'}); give mer-unibench:DIR:SPLIT")
    subtitles, notes = _subtitles(root), _rationales(rationales) if rationales else {}
    out = []
    for name, entry in corpora[split].items():
        where = f"{labels_path}: {split} {name}"
        answer, val = label_of(entry, where)
        video = _find(os.path.join(root, "video"), re.escape(name) + r"(\..+)?")
        if not video:
            raise DataError(f"{where}: no video/{name}.* in {root}")
        audio = os.path.join(root, "audio", name + ".wav")
        question = SENTIMENT_QUESTION if entry.get("emo") in (None, "") else EMOTION_QUESTION
        subtitle = subtitles.get(str(name), "")
        out.append(Example(
            prompt=(f'The subtitle says: "{subtitle}". ' if subtitle else "") + question,
            answer=answer, rationale=notes.get(str(name), ""),
            videos=[os.path.join(root, "video", video[0])],
            audios=[audio] if os.path.exists(audio) and not audio_in_video else [],
            where=where))
    if rationales:
        missing = [e for e in out if not e.rationale]
        if missing:
            raise DataError(f"{rationales}: no rationale for {missing[0].where}")
    return out


def _rationales(path: str) -> dict:
    """name -> rationale from a JSONL or CSV file with the columns name and rationale."""
    if not os.path.isfile(path):
        raise DataError(f"--rationales {path}: no such file")
    out = {}
    if path.endswith(".csv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            for i, r in enumerate(csv.DictReader(f), 2):
                if "name" not in r or "rationale" not in r:
                    raise DataError(f"{path}:{i}: expected the columns name and rationale")
                out[r["name"]] = r["rationale"]
        return out
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    out[str(r["name"])] = str(r["rationale"])
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{i}: expected {{\"name\": ..., \"rationale\": "
                                    f"...}} ({type(e).__name__})") from None
    return out


# ----------------------------------------------------------------------------------------
# The benchmark's metrics
# ----------------------------------------------------------------------------------------

def emotion_words(text: str, wheel: dict | None = None) -> set:
    """The classes (or, with an emotion wheel, the clusters) of the emotion words in `text`."""
    words = re.findall(r"[a-z]+", text.lower())
    if wheel is not None:
        return {wheel[w] for w in words if w in wheel}
    return {WORD_CLASS[w] for w in words if w in WORD_CLASS}


def sentiment_of(text: str) -> int:
    """+1, -1 or 0 (neither word, or both) of a response."""
    found = {SENTIMENT_WORDS[w] for w in re.findall(r"[a-z]+", text.lower())
             if w in SENTIMENT_WORDS}
    return found.pop() if len(found) == 1 else 0


def weighted_f1(gold: list, pred: list) -> float:
    """F1 of each gold class weighted by its support (scikit-learn's 'weighted')."""
    total, score = len(gold), 0.0
    for c in set(gold):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        score += f1 * sum(g == c for g in gold) / total
    return score


def metrics(texts: list, examples: list, wheel: dict | None = None) -> dict:
    """The benchmark's numbers for responses `texts` to `examples` (module docstring)."""
    rows = list(zip(texts, examples))
    sent = [(t, e) for t, e in rows if e.prompt.endswith(SENTIMENT_QUESTION)]
    emo = [(t, e) for t, e in rows if not e.prompt.endswith(SENTIMENT_QUESTION)]
    out = {}
    if emo:
        out["hit_rate"] = sum(e.answer in emotion_words(t) for t, e in emo) / len(emo)
    if sent:
        kept = [(t, e) for t, e in sent if e.answer != "neutral"]  # val 0: excluded
        gold = [SENTIMENT_WORDS[e.answer] for _, e in kept]
        pred = [sentiment_of(t) for t, _ in kept]
        if kept:
            out["sentiment_acc"] = sum(g == p for g, p in zip(gold, pred)) / len(kept)
            out["sentiment_weighted_f1"] = weighted_f1(gold, pred)
    if wheel is not None and emo:
        scores = []
        for t, e in emo:
            pred, gold = emotion_words(t, wheel), emotion_words(e.answer, wheel)
            if not pred or not gold:
                scores.append(0.0)
                continue
            p = len(pred & gold) / len(pred)
            r = len(pred & gold) / len(gold)
            scores.append(2 * p * r / (p + r) if p + r else 0.0)
        out["f_s"] = sum(scores) / len(scores)
    return out


def load_wheel(path: str) -> dict:
    """word -> cluster, from the user's emotion-wheel JSON file."""
    try:
        with open(path) as f:
            wheel = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--emotion-wheel {path}: not a readable JSON file ({e})") from None
    if not isinstance(wheel, dict) or not all(isinstance(v, str) for v in wheel.values()):
        raise DataError(f"--emotion-wheel {path}: expected an object of word -> cluster")
    return {str(k).lower(): v for k, v in wheel.items()}
