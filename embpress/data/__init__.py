"""CTR datasets: schema, the synthetic generator, loaders per format, preprocessing and cache."""

from embpress.data.cache import CacheError, default_cache_dir
from embpress.data.movielens import download_movielens
from embpress.data.preprocess import Source, Vocabulary
from embpress.data.registry import dataset_formats, load_dataset
from embpress.data.schema import CTRDataset, Split, frequency_order
from embpress.data.synthetic import SyntheticConfig, make_synthetic

__all__ = [
    "CTRDataset",
    "CacheError",
    "Source",
    "Split",
    "SyntheticConfig",
    "Vocabulary",
    "dataset_formats",
    "default_cache_dir",
    "download_movielens",
    "frequency_order",
    "load_dataset",
    "make_synthetic",
]
