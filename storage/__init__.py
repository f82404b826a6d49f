"""DuckDB storage: the only package that speaks SQL. It knows no model and no screen."""

from storage.store import (
    ConflictError,
    NotFoundError,
    Store,
    StoreError,
)

__all__ = ["ConflictError", "NotFoundError", "Store", "StoreError"]
