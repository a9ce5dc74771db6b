"""Finding the image files under a folder.

``scan(root)`` walks a folder tree and yields a ``FileEntry`` for every candidate image file and a
``ScanProblem`` for everything it had to skip that the user may want to hear about. Decoding is
not its job: a candidate may still turn out not to be an image, and the decoder records that.

Rules:

* Iterative (``os.scandir`` and an explicit stack), so deep trees cannot hit the recursion limit.
  A generator: memory grows with the entries of one folder and the number of folders, never with
  the number of files.
* Deterministic order: each folder's entries are sorted by name; a folder's files come first,
  then its subfolders, depth first.
* Names starting with ``"."`` (files and folders) are skipped unless ``include_hidden``. The root
  itself is always scanned, hidden or not.
* A candidate is a regular file whose extension (any case) is in ``IMAGE_EXTENSIONS``. A text
  file named ``x.jpg`` or an empty ``x.jpg`` is still a candidate. With ``sniff=True`` a file is
  also a candidate when its first bytes say image (``sniff_image``) -- but only files whose
  extension is missing or unknown are opened for that (``IMG_0001``, ``photo.dat``): an extension
  in ``NEVER_SNIFFED_EXTENSIONS`` (text, code, documents, archives, audio/video, camera raw) means
  the file is never opened, and a plain file is only stat-ed once it could be a candidate.
  So a tree full of source code or videos costs one ``readdir`` per folder, not one ``open`` per file.
  Empty files without an image extension are never sniffed.
* Symlinks (to files and folders) are followed when ``follow_symlinks``, and skipped silently when
  not (the root is always followed). A file's path is the path the user sees (absolute,
  normalised, not symlink-resolved); its size and mtime are the target's.
* Every folder is entered once, recognised by ``(st_dev, st_ino)``: a symlink to one of its own
  ancestors yields one ``ScanProblem("symlink loop")``; a second way into a folder already listed
  yields ``ScanProblem("folder already scanned ...")`` and is not listed again (no duplicates, no
  exponential blow-up through chains of links).
* Broken symlinks yield ``ScanProblem("broken symlink")`` unless their name says "not an image"
  (``NEVER_SNIFFED_EXTENSIONS``). FIFOs, sockets and device files are never opened (opening a FIFO
  blocks); they yield a ``ScanProblem`` when they carry an image extension and are ignored otherwise.
* A folder that cannot be listed yields ``ScanProblem("permission denied")`` (or the OS's reason)
  and the scan goes on.
* A root that does not exist, or is neither a folder nor a regular file, raises ``AltsearchError``
  at once (``scan`` validates its root before returning the generator). A regular file given as
  the root is yielded as it is, whatever its extension: the user named it.
* Hidden-file attributes of Windows are not looked at; only the leading dot counts.
"""

from __future__ import annotations

import errno
import logging
import operator
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import AltsearchError

log = logging.getLogger(__name__)

# .heic/.heif/.avif decode only when pillow-heif is installed; they are listed regardless, and the
# decoder records a failure when it cannot read them.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".heic", ".heif", ".avif",
})

# Files with these extensions are never opened to sniff their first bytes.
NEVER_SNIFFED_EXTENSIONS: frozenset[str] = frozenset({
    # text, data and code
    ".txt", ".md", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".conf", ".log", ".html", ".htm", ".css", ".js", ".mjs", ".ts", ".tsx", ".jsx",
    ".map", ".py", ".pyc", ".pyi", ".ipynb", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".class",
    ".jar", ".go", ".rs", ".rb", ".php", ".pl", ".sh", ".bat", ".ps1", ".sql", ".svg", ".xmp",
    ".aae", ".db", ".sqlite", ".sqlite3", ".npy", ".npz", ".safetensors", ".pt", ".pth", ".onnx",
    # documents and archives
    ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".ods", ".odp", ".rtf",
    ".epub", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".iso", ".dmg",
    ".exe", ".dll", ".so", ".dylib", ".o", ".a", ".ttf", ".otf", ".woff", ".woff2",
    # audio and video
    ".mp3", ".wav", ".flac", ".aac", ".ogg", ".oga", ".m4a", ".opus", ".wma", ".mp4", ".m4v",
    ".mov", ".avi", ".mkv", ".webm", ".wmv", ".flv", ".3gp", ".mts", ".m2ts", ".mpg", ".mpeg",
    # camera raw: TIFF-like containers that would sniff as "tiff" but are not supported images
    ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2",
    ".raf", ".pef", ".srw", ".x3f", ".raw", ".rwl", ".3fr", ".erf", ".kdc", ".mrw",
})

SNIFF_BYTES = 32

_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                          b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
# Non-blocking so that a FIFO swapped in after the stat cannot hang the scan.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A candidate image file: absolute path as the user sees it, size in bytes, mtime in seconds."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True)
class ScanProblem:
    """Something the scan skipped and the user may want to hear about."""

    path: str
    reason: str


@dataclass(frozen=True)
class _Options:
    include_hidden: bool
    follow_symlinks: bool
    sniff: bool


@dataclass(frozen=True)
class _Folder:
    path: str
    key: tuple[int, int]  # (st_dev, st_ino)
    is_link: bool


# --- sniffing ----------------------------------------------------------------------------


def image_kind_from_bytes(head: bytes) -> str | None:
    """The image format that the first bytes of a file announce, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    return _iso_bmff_kind(head)


def _iso_bmff_kind(head: bytes) -> str | None:
    """HEIF / AVIF: an ISO BMFF 'ftyp' box whose major or compatible brands name the format."""
    if head[4:8] != b"ftyp":
        return None
    box_end = min(len(head), max(16, int.from_bytes(head[:4], "big")))
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, box_end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heif"
    return None


def sniff_image(path: str | os.PathLike[str]) -> str | None:
    """Read the first ``SNIFF_BYTES`` bytes of ``path`` and name the image format they announce.

    Returns "jpeg", "png", "gif", "webp", "bmp", "tiff", "heif", "avif", or None when the bytes
    say nothing known. Anything but a regular file (a FIFO, a device) gives None without being
    read: the file is opened non-blocking and checked with ``fstat`` first. Raises ``OSError``
    when the file cannot be opened or read.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, SNIFF_BYTES)
    finally:
        os.close(fd)
    return image_kind_from_bytes(head)


# --- classifying one entry ---------------------------------------------------------------


def _extension(name: str) -> str:
    """``os.path.splitext(name)[1].lower()`` (leading dots start no extension: ".jpg" has none), at a
    third of its cost: the scan asks it of every file."""
    dot = name.rfind(".")
    if dot <= 0 or (name[0] == "." and not name[:dot].lstrip(".")):
        return ""
    return name[dot:].lower()


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "folder"), (stat.S_ISREG, "file")):
        if test(mode):
            return kind
    return "unknown file type"


def _could_be_candidate(ext: str, opts: _Options) -> bool:
    """Whether a regular file with this extension is worth a stat: image extension, or sniffable."""
    return ext in IMAGE_EXTENSIONS or (opts.sniff and ext not in NEVER_SNIFFED_EXTENSIONS)


def _is_candidate(path: str, ext: str, size: int, opts: _Options) -> bool:
    if ext in IMAGE_EXTENSIONS:
        return True
    if not opts.sniff or ext in NEVER_SNIFFED_EXTENSIONS or size == 0:
        return False
    try:
        return sniff_image(path) is not None
    except OSError as exc:
        log.debug("cannot sniff %s: %s", path, exc)
        return False


def _stat_problem(path: str, name: str, is_link: bool, exc: OSError) -> ScanProblem | None:
    """Turn a failed stat into a problem report, or None for what is not worth reporting."""
    if isinstance(exc, FileNotFoundError):
        if is_link and _extension(name) not in NEVER_SNIFFED_EXTENSIONS:
            return ScanProblem(path, "broken symlink")
        log.debug("vanished during the scan: %s", path)
        return None
    if exc.errno == errno.ELOOP:
        return ScanProblem(path, "symlink loop")
    if isinstance(exc, PermissionError):
        return ScanProblem(path, "permission denied")
    return ScanProblem(path, exc.strerror or str(exc))


def _visit(entry: os.DirEntry[str], opts: _Options) -> FileEntry | ScanProblem | _Folder | None:
    """What one folder entry is to the scan: a candidate, a problem, a folder to enter, or nothing."""
    ext = _extension(entry.name)
    if ext in IMAGE_EXTENSIONS and entry.is_file(follow_symlinks=False):
        # the common case, a plain file named as an image (known from d_type, no system call): what the
        # general path below concludes, with a third of its calls (a million files: seconds)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            return _stat_problem(entry.path, entry.name, False, exc)
        if stat.S_ISREG(st.st_mode):
            return FileEntry(entry.path, st.st_size, st.st_mtime)
    is_link = False
    try:
        is_link = entry.is_symlink()
        if is_link and not opts.follow_symlinks:
            return None
        if not is_link and not _worth_stat(entry, ext, opts):
            return None
        st = os.stat(entry.path) if is_link else entry.stat(follow_symlinks=False)
    except OSError as exc:
        return _stat_problem(entry.path, entry.name, is_link, exc)
    if stat.S_ISDIR(st.st_mode):
        return _Folder(entry.path, (st.st_dev, st.st_ino), is_link)
    if stat.S_ISREG(st.st_mode):
        if _is_candidate(entry.path, ext, st.st_size, opts):
            return FileEntry(entry.path, st.st_size, st.st_mtime)
        return None
    if ext in IMAGE_EXTENSIONS:
        return ScanProblem(entry.path, f"not a regular file ({_file_kind(st.st_mode)})")
    return None


def _worth_stat(entry: os.DirEntry[str], ext: str, opts: _Options) -> bool:
    """Skip the stat call for plain entries that cannot matter (uses the cached d_type on Linux)."""
    if entry.is_dir(follow_symlinks=False):
        return True
    if entry.is_file(follow_symlinks=False):
        return _could_be_candidate(ext, opts)
    return ext in IMAGE_EXTENSIONS  # fifo, socket, device: report only those


# --- walking -----------------------------------------------------------------------------


_name = operator.attrgetter("name")


def _list_folder(folder: str) -> list[os.DirEntry[str]] | ScanProblem:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=_name)
    except PermissionError:
        return ScanProblem(folder, "permission denied")
    except OSError as exc:
        return ScanProblem(folder, f"cannot list folder: {exc.strerror or exc}")


def _admit(folders: list[_Folder], seen: set[tuple[int, int]], ancestors: list[tuple[int, int]]
           ) -> tuple[list[_Folder], list[ScanProblem]]:
    """Decide which subfolders to enter; real folders claim their identity before symlinked ones."""
    verdict: dict[str, ScanProblem | None] = {}
    for folder in sorted(folders, key=lambda f: f.is_link):
        if folder.key in ancestors:
            reason = "symlink loop" if folder.is_link else "filesystem loop"
            verdict[folder.path] = ScanProblem(folder.path, reason)
        elif folder.key in seen:
            reason = "folder already scanned (reached twice through symlinks)"
            verdict[folder.path] = ScanProblem(folder.path, reason)
        else:
            seen.add(folder.key)
            verdict[folder.path] = None
    enter = [f for f in folders if verdict[f.path] is None]
    problems = [p for f in folders if (p := verdict[f.path]) is not None]
    return enter, problems


def _walk(root: str, root_key: tuple[int, int], opts: _Options) -> Iterator[FileEntry | ScanProblem]:
    seen = {root_key}
    ancestors: list[tuple[int, int]] = []
    stack: list[tuple[str, int, tuple[int, int]]] = [(root, 0, root_key)]
    while stack:
        folder, depth, key = stack.pop()
        del ancestors[depth:]
        ancestors.append(key)
        entries = _list_folder(folder)
        if isinstance(entries, ScanProblem):
            yield entries
            continue
        subfolders: list[_Folder] = []
        for entry in entries:
            if not opts.include_hidden and entry.name.startswith("."):
                continue
            found = _visit(entry, opts)
            if isinstance(found, _Folder):
                subfolders.append(found)
            elif found is not None:
                yield found
        enter, problems = _admit(subfolders, seen, ancestors)
        yield from problems
        stack.extend((f.path, depth + 1, f.key) for f in reversed(enter))


def _root_stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise AltsearchError(f"folder not found: {path}") from None
    except OSError as exc:
        raise AltsearchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # an embedded NUL byte
        raise AltsearchError(f"not a valid path: {path!r}") from exc


def scan(root: str | os.PathLike[str] | bytes, *, include_hidden: bool = False,
         follow_symlinks: bool = True, sniff: bool = True) -> Iterator[FileEntry | ScanProblem]:
    """Yield the candidate image files under ``root`` and the problems met on the way.

    The root is checked at once: a missing root, or one that is neither a folder nor a regular
    file, raises ``AltsearchError``. See the module docstring for the rules.
    """
    path = os.path.abspath(os.fsdecode(os.fspath(root)))
    st = _root_stat(path)
    if stat.S_ISREG(st.st_mode):
        return iter([FileEntry(path, st.st_size, st.st_mtime)])
    if not stat.S_ISDIR(st.st_mode):
        raise AltsearchError(f"not a folder: {path} ({_file_kind(st.st_mode)})")
    opts = _Options(include_hidden=include_hidden, follow_symlinks=follow_symlinks, sniff=sniff)
    return _walk(path, (st.st_dev, st.st_ino), opts)
