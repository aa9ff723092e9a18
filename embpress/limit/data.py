"""LIMIT-style retrieval data of any size: "<name> likes A, B, ... and Z." documents, "Who likes X?" queries.

The construction of google-deepmind/limit (``code/generate_limit_dataset.ipynb``): the qrels are *dense*
over the fewest documents n with C(n, k) >= queries (46 for 1000 queries, k = 2): query i is relevant to
the i-th k-subset of those n documents, in ``itertools.combinations`` order. Each query asks about one
item of its own; every document relevant to a query likes its item; then every document is topped up with
random other (non-query) items to ``items_per_doc`` (45 in LIMIT). The other documents are distractors
that like only non-query items. So every query has exactly k relevant documents, and LIMIT-small is the
``n_docs = 46`` case, LIMIT the ``n_docs = 50_000`` one.

Vocabulary: the published items and names are downloaded lists that embpress does not ship. Give
``vocab_from`` (a LIMIT folder, e.g. LIMIT-small) to reuse the items and name parts of its corpus, or get
a deterministic pseudo-word vocabulary (pseudo-word names are added when a vocabulary has too few to name
every document uniquely). Documents are written in a seeded random order.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embpress.atomic import atomic_open


@dataclass(frozen=True)
class LimitVocab:
    """Items people like, and first and last names."""

    items: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]


_LIKES = re.compile(r"^(?P<name>.+?) likes (?P<items>.+?)\.?$")


def vocab_from_corpus(folder: str | os.PathLike) -> LimitVocab:
    """Items and name parts of a LIMIT corpus (``corpus.jsonl`` lines "<First Last> likes A, B and C.")."""
    path = Path(folder) / "corpus.jsonl"
    items: dict[str, None] = {}
    firsts: dict[str, None] = {}
    lasts: dict[str, None] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            text = json.loads(line).get("text", "")
            m = _LIKES.match(text.strip())
            if m is None:
                raise ValueError(f"{path}:{lineno}: not a LIMIT document ('<name> likes A, B and C.'): {text[:60]!r}")
            name = m["name"].split()
            firsts[name[0]] = None
            lasts[name[-1]] = None
            head, _, last = m["items"].rpartition(" and ")
            for it in [*(head.split(", ") if head else []), last]:
                if it.strip():
                    items[it.strip()] = None
    return LimitVocab(tuple(items), tuple(firsts), tuple(lasts))


def pseudo_vocab(n_items: int, n_names: int, *, seed: int = 0) -> LimitVocab:
    """Deterministic pronounceable pseudo-words: ``n_items`` items, ``n_names`` first and last names."""
    rng = np.random.default_rng(seed)
    cons, vow = list("bcdfghklmnprstvz"), list("aeiou")

    def words(n: int, syllables: tuple[int, int], suffix: str) -> tuple[str, ...]:
        out: dict[str, None] = {}
        while len(out) < n:
            s = int(rng.integers(syllables[0], syllables[1] + 1))
            w = "".join(cons[int(rng.integers(len(cons)))] + vow[int(rng.integers(len(vow)))] for _ in range(s))
            out[(w + suffix).capitalize()] = None
        return tuple(out)

    return LimitVocab(words(n_items, (2, 3), "s"), words(n_names, (2, 3), ""), words(n_names, (2, 4), "n"))


@dataclass(frozen=True)
class LimitData:
    """A generated LIMIT set: document ids (names) and texts, query ids and texts, qrels (query -> docs)."""

    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    likes: list[list[str]]  # each document's items, in its text's order


def dense_docs_needed(n_queries: int, k: int) -> int:
    """The fewest documents n with C(n, k) >= n_queries (46 for 1000 queries and k = 2).

    >>> dense_docs_needed(1000, 2)
    46
    """
    n = k
    while math.comb(n, k) < n_queries:
        n += 1
    return n


def generate_limit(n_docs: int, *, n_queries: int = 1000, k: int = 2, items_per_doc: int = 45, seed: int = 0,
                   vocab: LimitVocab | None = None) -> LimitData:
    """Generate a LIMIT-style set with ``n_docs`` documents (see the module docstring)."""
    for name, v in (("n_docs", n_docs), ("n_queries", n_queries), ("k", k), ("items_per_doc", items_per_doc)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    n_dense = dense_docs_needed(n_queries, k)
    if n_dense > n_docs:
        raise ValueError(f"{n_queries} queries with k={k} need at least {n_dense} documents, got n_docs={n_docs}")
    rng = np.random.default_rng(seed)
    if vocab is None:
        vocab = pseudo_vocab(n_queries + max(4 * items_per_doc, 850), max(64, int(math.isqrt(2 * n_docs)) + 8),
                             seed=seed)
    items = list(vocab.items)
    if len(items) < n_queries + items_per_doc:
        raise ValueError(f"the vocabulary has {len(items)} items; {n_queries} queries and {items_per_doc} items "
                         f"per document need at least {n_queries + items_per_doc}")
    if len(vocab.first_names) * len(vocab.last_names) < n_docs:  # too few names: add pseudo-word ones
        extra = pseudo_vocab(0, int(math.isqrt(n_docs)) + 8, seed=seed)
        vocab = LimitVocab(vocab.items, vocab.first_names + tuple(n for n in extra.first_names
                                                                   if n not in vocab.first_names),
                           vocab.last_names + tuple(n for n in extra.last_names if n not in vocab.last_names))
    order = rng.permutation(len(items))
    query_items = [items[i] for i in order[:n_queries]]
    other_items = np.array([items[i] for i in order[n_queries:]], dtype=object)
    combos = list(itertools.islice(itertools.combinations(range(n_dense), k), n_queries))
    likes: list[list[str]] = [[] for _ in range(n_docs)]
    for qi, combo in enumerate(combos):
        for doc in combo:
            likes[doc].append(query_items[qi])
    for doc in range(n_docs):
        need = items_per_doc - len(likes[doc])
        if need > 0:
            likes[doc].extend(other_items[rng.choice(other_items.size, need, replace=False)].tolist())
        rng.shuffle(likes[doc])
    # unique names: distinct (first, last) index pairs
    nf, nl = len(vocab.first_names), len(vocab.last_names)
    pairs = rng.choice(nf * nl, n_docs, replace=False)
    names = [f"{vocab.first_names[p // nl]} {vocab.last_names[p % nl]}" for p in pairs]
    position = rng.permutation(n_docs)  # document i is written at row position[i]
    corpus_ids: list[str] = [""] * n_docs
    corpus_texts: list[str] = [""] * n_docs
    doc_likes: list[list[str]] = [[] for _ in range(n_docs)]
    for doc in range(n_docs):
        row = int(position[doc])
        corpus_ids[row] = names[doc]
        lk = likes[doc]
        body = lk[0] if len(lk) == 1 else ", ".join(lk[:-1]) + " and " + lk[-1]
        corpus_texts[row] = f"{names[doc]} likes {body}."
        doc_likes[row] = lk
    query_ids = [f"query_{i}" for i in range(len(combos))]
    query_texts = [f"Who likes {query_items[i]}?" for i in range(len(combos))]
    qrels = {query_ids[i]: {names[d]: 1 for d in combo} for i, combo in enumerate(combos)}
    return LimitData(corpus_ids, corpus_texts, query_ids, query_texts, qrels, doc_likes)


def write_limit(data: LimitData, folder: str | os.PathLike) -> Path:
    """Write ``corpus.jsonl``, ``queries.jsonl`` and ``qrels.jsonl`` (MTEB layout, as LIMIT ships), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / "corpus.jsonl", "w") as fh:
        for i, t in zip(data.corpus_ids, data.corpus_texts, strict=True):
            fh.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
    with atomic_open(folder / "queries.jsonl", "w") as fh:
        for i, t in zip(data.query_ids, data.query_texts, strict=True):
            fh.write(json.dumps({"_id": i, "text": t}) + "\n")
    with atomic_open(folder / "qrels.jsonl", "w") as fh:
        for q, docs in data.qrels.items():
            for d, s in docs.items():
                fh.write(json.dumps({"query-id": q, "corpus-id": d, "score": s}) + "\n")
    return folder


def subset_limit(data: LimitData, n_docs: int, *, seed: int = 0) -> LimitData:
    """``n_docs`` documents of ``data``: every document some query judges relevant, plus seeded random others
    (distractors), in their original order; queries and qrels unchanged. A cheaper stand-in for a large set
    where encoding every document costs too much (say so beside its figures)."""
    relevant = {doc for docs in data.qrels.values() for doc in docs}
    if not len(relevant) <= n_docs <= len(data.corpus_ids):
        raise ValueError(f"subset size must be in [{len(relevant)} (the judged documents), "
                         f"{len(data.corpus_ids)}], got {n_docs}")
    rest = np.array([i for i, d in enumerate(data.corpus_ids) if d not in relevant], dtype=np.int64)
    pick = np.random.default_rng(seed).choice(rest.size, n_docs - len(relevant), replace=False)
    keep = set(rest[pick].tolist()) | {i for i, d in enumerate(data.corpus_ids) if d in relevant}
    rows = sorted(keep)
    return LimitData([data.corpus_ids[i] for i in rows], [data.corpus_texts[i] for i in rows], list(data.query_ids),
                     list(data.query_texts), {q: dict(v) for q, v in data.qrels.items()}, [data.likes[i] for i in rows])
