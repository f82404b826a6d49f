"""DuckDB storage: the only package that speaks SQL. It knows no model and no screen."""

from storage.errors import (
    AppError,
    ConflictError,
    DatabaseInUseError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    StorageWriteError,
    StoreError,
)
from storage.store import RecordedVote, Store

__all__ = [
    "AppError",
    "ConflictError",
    "DatabaseInUseError",
    "ForbiddenError",
    "InvalidInputError",
    "NotFoundError",
    "RecordedVote",
    "StorageWriteError",
    "Store",
    "StoreError",
]
