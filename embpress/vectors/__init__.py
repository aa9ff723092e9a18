"""Retrieval side: codecs for corpus vectors (fixed and learned), spec strings, scoring, and the index.

Importing this package registers every codec family, so :func:`build_codec` knows them all.
"""

from embpress.vectors.bebr import BEBRCodec
from embpress.vectors.binary import ITQBinarizer, RandomRotationBinarizer, SignBinarizer
from embpress.vectors.build import build_index
from embpress.vectors.codec import (
    Codec,
    ComposedCodec,
    NotFittedError,
    Reducer,
    build_codec,
    code_size,
    codec_from_state,
    register_codec,
    registered_codecs,
)
from embpress.vectors.distill import DistilledOPQ, DistilledPQ
from embpress.vectors.index import Index, attribute_equals, attribute_in
from embpress.vectors.metric import Metric, SearchResult, as_metric, pairwise_distances
from embpress.vectors.pq import OptimizedProductQuantizer, ProductQuantizer
from embpress.vectors.reduce import MatryoshkaReducer, PCAReducer
from embpress.vectors.rq import ResidualQuantizer
from embpress.vectors.scalar import Float16Codec, ScalarQuantizer
from embpress.vectors.vecio import VectorFile

__all__ = [
    "BEBRCodec",
    "ITQBinarizer",
    "MatryoshkaReducer",
    "OptimizedProductQuantizer",
    "PCAReducer",
    "ProductQuantizer",
    "RandomRotationBinarizer",
    "ResidualQuantizer",
    "SignBinarizer",
    "Codec",
    "DistilledOPQ",
    "DistilledPQ",
    "ComposedCodec",
    "Float16Codec",
    "Index",
    "Metric",
    "NotFittedError",
    "Reducer",
    "ScalarQuantizer",
    "SearchResult",
    "VectorFile",
    "attribute_equals",
    "attribute_in",
    "as_metric",
    "build_codec",
    "build_index",
    "code_size",
    "codec_from_state",
    "pairwise_distances",
    "register_codec",
    "registered_codecs",
]
