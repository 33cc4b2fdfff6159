"""Storage: one seam for every location gradyard reads or writes (see :mod:`gradyard.storage.core`).

Light to import: fsspec and s3fs load only when a location is opened, so the
job schema can use :mod:`gradyard.storage.urls` and :func:`redact` cheaply.
"""

from gradyard.storage.core import (
    RecordError,
    Storage,
    StorageError,
    check_storage,
    dumps,
    open_storage,
    resolve_endpoint,
    storage_from_spec,
    sync_dir,
    write_local_atomically,
    write_local_durably,
)
from gradyard.storage.redact import redact, redact_tree, register_secret
from gradyard.storage.retry import DEFAULT, PATIENT, RetryPolicy, TransientStorageError, is_transient
from gradyard.storage.transfer import SizeMismatch, Transfer

__all__ = [
    "DEFAULT", "PATIENT", "RecordError", "RetryPolicy", "SizeMismatch", "Storage", "StorageError", "Transfer",
    "TransientStorageError",
    "check_storage", "dumps", "is_transient", "open_storage", "redact", "redact_tree", "register_secret",
    "resolve_endpoint", "storage_from_spec", "sync_dir", "write_local_atomically", "write_local_durably",
]
