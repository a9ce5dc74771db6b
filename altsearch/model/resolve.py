"""Turning a model source (a local folder or a Hugging Face hub id) into a local folder."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "BAAI/AltCLIP"
# Files a text+image model needs; the weights may also be sharded.
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DOWNLOAD_PATTERNS = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "sentencepiece.bpe.model", "*.safetensors",
                     "model.safetensors.index.json"]
# BAAI/AltCLIP's main branch ships only pytorch_model.bin; its safetensors copy lives on this ref.
SAFETENSORS_REVISIONS = {"BAAI/AltCLIP": "refs/pr/7"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def missing_files(folder: Path) -> list[str]:
    """What a usable model folder lacks ([] when complete)."""
    missing = [n for n in CONFIG_FILES if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        if (folder / "pytorch_model.bin").is_file():
            missing.append(f"model.safetensors (only pytorch_model.bin is there: convert it once with "
                           f"`altsearch model convert {folder} NEW_FOLDER`)")
        else:
            missing.append("model.safetensors")
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        missing.append("tokenizer.json")
    return missing


def cached_snapshot(repo_id: str, cache: Path | None = None) -> Path | None:
    """The newest complete snapshot of ``repo_id`` in the local Hugging Face cache, if any."""
    repo = (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    preferred = []
    for ref in ("main", SAFETENSORS_REVISIONS.get(repo_id, "")):
        ref_file = repo / "refs" / ref
        if ref and ref_file.is_file():
            preferred.append(snaps / ref_file.read_text().strip())
    others = sorted((p for p in snaps.iterdir() if p not in preferred),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in preferred + others:
        if snap.is_dir() and not missing_files(snap):
            return snap
    return None


def resolve(source: str | os.PathLike = DEFAULT_MODEL, *, download: bool = True) -> Path:
    """A local folder holding the model named by ``source``.

    A path that exists is used as it is. A hub id (``org/name``) is looked up in the local Hugging Face
    cache, then downloaded with ``huggingface_hub`` when that is installed and the hub is reachable.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; a model is a folder holding config.json and weights")
        missing = missing_files(path)
        if missing:
            raise ModelNotFoundError(f"{path} is not a complete AltCLIP model folder: missing "
                                     f"{', '.join(missing)}")
        return path
    text = str(source)
    if not _HUB_ID.match(text):
        raise ModelNotFoundError(f"model folder not found: {text}")
    snap = cached_snapshot(text)
    if snap is not None:
        return snap
    why = "downloads are off" if not download else _download(text)
    if isinstance(why, Path):
        return why
    raise ModelNotFoundError(
        f"{text} is not on this machine ({why}); needed: config.json, model.safetensors, tokenizer.json, "
        f"preprocessor_config.json. Get them with `pip install 'altsearch[hub]'` and a network connection "
        f"(altsearch downloads on first use), or download them into a folder and pass that folder as the model")


def _download(repo_id: str) -> Path | str:
    """Download ``repo_id``; returns the folder, or why it could not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return f"HF_HUB_OFFLINE is set and it is not in the cache at {hub_cache_dir()}"
    try:
        import huggingface_hub
    except ImportError:
        return f"not in the cache at {hub_cache_dir()}, and huggingface_hub is not installed"
    revisions = [None] + ([SAFETENSORS_REVISIONS[repo_id]] if repo_id in SAFETENSORS_REVISIONS else [])
    reason = "no safetensors weights found"
    for rev in revisions:
        try:
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, revision=rev, allow_patterns=DOWNLOAD_PATTERNS, cache_dir=hub_cache_dir()))
        except Exception as e:  # noqa: BLE001 - network/hub errors come in many types; all mean "not downloadable"
            reason = f"download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if not missing_files(folder):
            log.info("downloaded %s (revision %s) to %s", repo_id, rev or "main", folder)
            return folder
        reason = f"downloaded revision {rev or 'main'} lacks {', '.join(missing_files(folder))}"
    return reason
