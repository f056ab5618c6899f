"""What the group report shows of per-image tables: bounded, so a 10,000-image dataset gives a report that opens.

The full tables stay in their files (``manifest.tsv``, ``qc.tsv``, ``group_audit.json``); the report shows the
images that need attention first, up to a limit, and says how many more there are and where.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

#: Manifest rows the report shows at most.
MANIFEST_ROWS = 200
#: Items of one check, or of one QC list, the report shows at most.
LIST_ITEMS = 50


def capped(items: Sequence[Any], where: str, limit: int | None = None) -> dict[str, Any]:
    """The first ``limit`` items (default :data:`LIST_ITEMS`), and how many more there are in ``where``.

    >>> capped(list(range(5)), "qc.tsv", limit=2)
    {'shown': [0, 1], 'more': 3, 'where': 'qc.tsv'}
    """
    limit = LIST_ITEMS if limit is None else limit
    return {"shown": list(items[:limit]), "more": max(len(items) - limit, 0), "where": where}


def manifest_rows(table: pd.DataFrame, limit: int = MANIFEST_ROWS) -> dict[str, Any]:
    """Up to ``limit`` manifest rows: those with audit flags, duplicates or an unreadable image first, then the
    others in the manifest's order; with the counts the report states."""
    attention = (
        table["flags"].astype(str).str.len().gt(0)
        | table["duplicate_of"].astype(str).str.len().gt(0)
        | ~table["readable"].astype(bool)
    )
    order = pd.concat([table[attention], table[~attention]]) if len(table) > limit else table
    rows = order.head(limit).to_dict(orient="records")
    for row in rows:
        row["flags"] = [f for f in str(row["flags"]).split(",") if f]
    return {"rows": rows, "shown": len(rows), "total": len(table), "attention": int(attention.sum())}
