"""LIMIT: the free-embedding capacity probe (critical n per dimension) and LIMIT-style retrieval data."""

from embpress.limit.probe import (
    FitResult,
    ProbeRun,
    codec_check,
    critical_n,
    fit_free_embeddings,
    paper_critical_n,
    probe,
    subset_qrels,
)

__all__ = [
    "FitResult",
    "ProbeRun",
    "codec_check",
    "critical_n",
    "fit_free_embeddings",
    "paper_critical_n",
    "probe",
    "subset_qrels",
]
