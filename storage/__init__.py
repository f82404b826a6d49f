"""DuckDB storage: the only package that speaks SQL. It knows no model and no screen."""

from storage.errors import AppError
from storage.store import (
    ConflictError,
    DatabaseInUseError,
    ForbiddenError,
    NotFoundError,
    StorageWriteError,
    Store,
    StoreError,
)

__all__ = [
    "AppError",
    "ConflictError",
    "DatabaseInUseError",
    "ForbiddenError",
    "NotFoundError",
    "StorageWriteError",
    "Store",
    "StoreError",
]
