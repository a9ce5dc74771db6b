"""Index files as older versions of altsearch wrote them, for the tests that open such folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np

from altsearch.vectors import IndexHeader, header_path


def write_old_flat_file(path: Path, ids: np.ndarray, vecs: np.ndarray, *, generation: int, catalog_id: str) -> None:
    """vectors.faiss and its header as altsearch saved a flat index before flat indexes were built from
    the catalogue: an IndexIDMap2 over an IndexFlatIP, and a header of kind "flat" whose checksum,
    generation and catalogue id make it look current."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.asarray(ids, np.int64))
    faiss.write_index(index, str(path))
    data = Path(path).read_bytes()
    header = IndexHeader(kind="flat", dim=vecs.shape[1], count=len(ids), size_bytes=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), generation=generation, catalog_id=catalog_id,
                         built_count=len(ids), nlist=0, nprobe=0, faiss_version=faiss.__version__, saved_at=0.0)
    header_path(Path(path)).write_text(header.to_json())


def hash_like_before_hash_kinds(catalog_file: Path) -> int:
    """Rewrite a catalogue as altsearch left it before catalogues named their content hash: every file's
    hash BLAKE2b-128 of its bytes, and no ``content_hash`` meta key. Returns the rows rewritten."""
    import sqlite3

    from altsearch.catalog import decode_path

    with sqlite3.connect(catalog_file) as conn:
        rows = conn.execute("SELECT id, path FROM images").fetchall()
        for image_id, path in rows:
            digest = hashlib.blake2b(Path(decode_path(path)).read_bytes(), digest_size=16).hexdigest()
            conn.execute("UPDATE images SET content_hash = ? WHERE id = ?", (digest, image_id))
        conn.execute("DELETE FROM meta WHERE key = 'content_hash'")
    conn.close()
    return len(rows)
