"""Learnable compressed embedding tables, one family per module, built by short name.

>>> from embpress.tables import Field, Ratio, build_table
>>> table = build_table("qr", fields=[Field("user", 100_000)], dim=16, budget=Ratio(10))
>>> table.serving_bytes() <= table.full_bytes / 10
True
"""

from embpress.tables.adapt import AdaptiveEmbedding
from embpress.tables.alpt import ALPTTable
from embpress.tables.autodim import AutoDimTable
from embpress.tables.autosrh import AutoSrhColumnsTable, AutoSrhTable
from embpress.tables.base import (
    Budget,
    BudgetError,
    CompressedTable,
    Embedding,
    Field,
    ParamGroup,
    Ratio,
    Stage,
    StageContext,
    build_table,
    full_table_bytes,
    method_family,
    parse_budget,
    register_table,
    registered_tables,
    table_class,
)
from embpress.tables.dedup import DedupTable
from embpress.tables.deeplight import DeepLightTable
from embpress.tables.dhash import DoubleHashTable
from embpress.tables.dhe import DeepHashEmbedding, SharedDeepHashEmbedding
from embpress.tables.dnis import DNISTable
from embpress.tables.dpq import DPQTable
from embpress.tables.full import FullTable, NoIdTable
from embpress.tables.hash import HashTable
from embpress.tables.mde import MDETable
from embpress.tables.mgqe import MGQETable
from embpress.tables.optembed import OptEmbedTable
from embpress.tables.pep import PEPTable
from embpress.tables.qat import Int8QATTable, Int16QATTable
from embpress.tables.qr import QRTable
from embpress.tables.quant import Int8Table, Int16Table, PostTrainingQuantized
from embpress.tables.robe import RobeTable
from embpress.tables.sid import SemanticHashTable, SemanticIdTable, SemanticNgramTable
from embpress.tables.tt import TTTable
from embpress.tables.unified import UnifiedTable

__all__ = [
    "Budget", "BudgetError", "CompressedTable", "Embedding", "Field", "FullTable", "HashTable",
    "NoIdTable", "ParamGroup", "Ratio", "Stage", "StageContext", "build_table", "full_table_bytes", "method_family", "parse_budget",
    "register_table", "registered_tables", "table_class",
    "QRTable", "UnifiedTable", "PostTrainingQuantized", "Int8Table", "Int16Table",
    "TTTable",
    "MGQETable", "DedupTable",
    "AdaptiveEmbedding", "DoubleHashTable", "DeepHashEmbedding", "SharedDeepHashEmbedding", "RobeTable",
    "Int8QATTable", "Int16QATTable", "ALPTTable", "DPQTable", "PEPTable", "DeepLightTable", "AutoSrhTable", "AutoSrhColumnsTable",
    "MDETable", "AutoDimTable", "DNISTable", "OptEmbedTable",
    "SemanticIdTable", "SemanticNgramTable", "SemanticHashTable",
]
