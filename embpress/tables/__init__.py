"""Learnable compressed embedding tables, one family per module, built by short name.

>>> from embpress.tables import Field, Ratio, build_table
>>> table = build_table("qr", fields=[Field("user", 100_000)], dim=16, budget=Ratio(10))
>>> table.serving_bytes() <= table.full_bytes / 10
True
"""

from embpress.tables.base import (
    Budget,
    BudgetError,
    CompressedTable,
    Embedding,
    Field,
    Ratio,
    Stage,
    StageContext,
    build_table,
    full_table_bytes,
    parse_budget,
    register_table,
    registered_tables,
    table_class,
)
from embpress.tables.full import FullTable, NoIdTable
from embpress.tables.hash import HashTable

__all__ = [
    "Budget", "BudgetError", "CompressedTable", "Embedding", "Field", "FullTable", "HashTable",
    "NoIdTable", "Ratio", "Stage", "StageContext", "build_table", "full_table_bytes", "parse_budget",
    "register_table", "registered_tables", "table_class",
]
