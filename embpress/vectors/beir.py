"""BEIR / MTEB retrieval folders: corpus, queries and relevance judgements (qrels).

Layout (BEIR, https://github.com/beir-cellar/beir; MTEB uses the same files)::

    corpus.jsonl        {"_id": str, "title": str, "text": str} per line
    queries.jsonl       {"_id": str, "text": str} per line
    qrels/test.tsv      "query-id<TAB>corpus-id<TAB>score" with a header line   (BEIR)
    qrels.jsonl         {"query-id": str, "corpus-id": str, "score": int}       (MTEB)

A document's text is BEIR's ``(title + " " + text).strip()``. Malformed lines raise
``ValueError`` naming the file and the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class BeirDataset:
    """A loaded retrieval set. Queries are those judged in ``qrels`` (BEIR's convention).

    Attributes:
        name: folder name.
        corpus_ids, corpus_texts: N document ids and texts (title + " " + text).
        query_ids, query_texts: Q query ids and texts.
        qrels: query id -> {corpus id: relevance} (relevance > 0 only).
    """

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: Qrels


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; each object must have the ``required`` keys."""
    rows = []
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; a line needs {list(required)}")
        rows.append((lineno, obj))
    return rows


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file; bytes that are not UTF-8 raise
    ``ValueError`` naming the file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _str_field(path: Path, lineno: int, obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{path}:{lineno}: field {key!r} must be a string, got {value!r}")
    return str(value)


def read_corpus(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read ``corpus.jsonl``: (ids, texts) with text = ``(title + " " + text).strip()``."""
    path = Path(path)
    ids, texts, seen = [], [], {}
    for lineno, obj in _read_jsonl(path, ("_id", "text")):
        doc_id = _str_field(path, lineno, obj, "_id")
        if doc_id in seen:
            raise ValueError(f"{path}:{lineno}: duplicate document id {doc_id!r} (first on line {seen[doc_id]})")
        seen[doc_id] = lineno
        title = _str_field(path, lineno, obj, "title")
        text = _str_field(path, lineno, obj, "text")
        ids.append(doc_id)
        texts.append((title + " " + text).strip())
    return ids, texts


def read_queries(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read ``queries.jsonl``: (ids, texts)."""
    path = Path(path)
    ids, texts, seen = [], [], {}
    for lineno, obj in _read_jsonl(path, ("_id", "text")):
        qid = _str_field(path, lineno, obj, "_id")
        if qid in seen:
            raise ValueError(f"{path}:{lineno}: duplicate query id {qid!r} (first on line {seen[qid]})")
        seen[qid] = lineno
        ids.append(qid)
        texts.append(_str_field(path, lineno, obj, "text"))
    return ids, texts


def _add_qrel(qrels: Qrels, path: Path, lineno: int, qid: str, did: str, score: object) -> None:
    try:
        rel = int(score)  # type: ignore[call-overload]
        if isinstance(score, float) and rel != score:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{lineno}: score must be an integer, got {score!r}") from None
    if not qid or not did:
        raise ValueError(f"{path}:{lineno}: empty query-id or corpus-id")
    if rel > 0:  # pytrec_eval / ranx count only positive judgements as relevant
        qrels.setdefault(qid, {})[did] = rel


def read_qrels(path: str | os.PathLike) -> Qrels:
    """Read qrels from a ``.tsv`` (header ``query-id corpus-id score``) or a ``.jsonl`` file.

    Judgements with score <= 0 are dropped: they are not relevant for nDCG or recall.
    """
    path = Path(path)
    qrels: Qrels = {}
    if path.suffix == ".jsonl":
        for lineno, obj in _read_jsonl(path, ("query-id", "corpus-id", "score")):
            _add_qrel(qrels, path, lineno, _str_field(path, lineno, obj, "query-id"),
                      _str_field(path, lineno, obj, "corpus-id"), obj["score"])
        return qrels
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if lineno == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # header
        if len(parts) == 4:  # TREC style: qid 0 docid score
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns "
                             f"(query-id, corpus-id, score), got {len(parts)}: {line!r}")
        _add_qrel(qrels, path, lineno, parts[0].strip(), parts[1].strip(), parts[2].strip())
    return qrels


def find_qrels(folder: str | os.PathLike, split: str = "test") -> Path:
    """The qrels file of ``split`` in a BEIR/MTEB folder: ``qrels/{split}.tsv|jsonl`` or ``qrels.jsonl|tsv``."""
    folder = Path(folder)
    candidates = [folder / "qrels" / f"{split}.tsv", folder / "qrels" / f"{split}.jsonl",
                  folder / "qrels.jsonl", folder / "qrels.tsv"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no qrels for split {split!r} in {folder}; looked for "
                            + ", ".join(str(c.relative_to(folder)) for c in candidates))


def load_beir(folder: str | os.PathLike, *, split: str = "test") -> BeirDataset:
    """Load a BEIR/MTEB folder; keep only the queries judged in ``split``'s qrels.

    Qrels naming a query or document absent from the files raise ``ValueError``.
    """
    folder = Path(folder)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: a BEIR folder holds corpus.jsonl, "
                                    "queries.jsonl and qrels/<split>.tsv (or qrels.jsonl)")
    corpus_ids, corpus_texts = read_corpus(folder / "corpus.jsonl")
    if not corpus_ids:
        raise ValueError(f"{folder / 'corpus.jsonl'}: empty corpus")
    all_qids, all_qtexts = read_queries(folder / "queries.jsonl")
    qrels_path = find_qrels(folder, split)
    qrels = read_qrels(qrels_path)
    known_docs = set(corpus_ids)
    by_id = dict(zip(all_qids, all_qtexts, strict=True))
    for qid, rels in qrels.items():
        if qid not in by_id:
            raise ValueError(f"{qrels_path}: query id {qid!r} is not in {folder / 'queries.jsonl'}")
        unknown = [d for d in rels if d not in known_docs]
        if unknown:
            raise ValueError(f"{qrels_path}: query {qid!r} judges document(s) {unknown[:3]} "
                             f"absent from {folder / 'corpus.jsonl'}")
    query_ids = [q for q in all_qids if q in qrels]
    if not query_ids:
        raise ValueError(f"{qrels_path}: no positive judgements")
    return BeirDataset(name=folder.resolve().name, corpus_ids=corpus_ids, corpus_texts=corpus_texts,
                       query_ids=query_ids, query_texts=[by_id[q] for q in query_ids], qrels=qrels)
