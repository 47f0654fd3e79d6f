"""The SQLite results store, now in :mod:`mlprune.storage` beside mlprune's other files on
disk; this module keeps the old import path (``from mlprune.store import ResultStore``)."""

from mlprune.storage import (
    APPLICATION_ID,
    BUSY_TIMEOUT_S,
    KEY,
    SCHEMA_VERSION,
    SOURCE,
    STORE_SUFFIXES,
    TABLE,
    ResultStore,
    check_same_source,
    is_store,
)

__all__ = ["APPLICATION_ID", "BUSY_TIMEOUT_S", "KEY", "SCHEMA_VERSION", "SOURCE",
           "STORE_SUFFIXES", "TABLE", "ResultStore", "check_same_source", "is_store"]
