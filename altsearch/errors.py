"""The one exception hierarchy of altsearch.

Library code raises these; only the CLI turns them into a message and an exit code.
Every message is one line that names the problem and, where there is one, the fix.
"""

from __future__ import annotations


class AltsearchError(Exception):
    """Base class of every error altsearch raises on purpose."""


# --- model -------------------------------------------------------------------------------


class ModelError(AltsearchError):
    """A model could not be resolved, read or run."""


class ModelNotFoundError(ModelError):
    """The model's files are not on this machine (and could not be downloaded)."""


class ConfigError(ModelError):
    """A config.json (or preprocessor_config.json) that altsearch cannot use."""


class CheckpointError(ModelError):
    """Weights that are missing, corrupt, or do not fit the configuration."""


class TokenizerError(ModelError):
    """No usable tokenizer files, or a tokenizer that does not fit the model."""


# --- images ------------------------------------------------------------------------------


class ImageError(AltsearchError):
    """A file that cannot be decoded as an image (corrupt, truncated, too large, not an image)."""


# --- index -------------------------------------------------------------------------------


class IndexStoreError(AltsearchError):
    """An index folder (catalogue + vector file) that cannot be opened or is inconsistent."""


class ModelMismatchError(IndexStoreError):
    """The index was built with another model than the one asked to query or extend it."""


class IndexTooLargeError(IndexStoreError):
    """An exact vector index, built in memory where the approximate one's file cannot be used (lost,
    damaged, or chosen flat), that would not fit in the memory available."""


class IndexLockedError(IndexStoreError):
    """Another process is writing to the index."""


class SchemaVersionError(IndexStoreError):
    """The catalogue was written by a newer altsearch."""


# --- queries -----------------------------------------------------------------------------


class QueryError(AltsearchError):
    """A query that cannot be run: empty, malformed, or naming an image that cannot be read."""
