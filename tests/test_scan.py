from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path

import pytest

from altsearch.errors import AltsearchError
from altsearch.scan import IMAGE_EXTENSIONS, FileEntry, ScanProblem, scan, sniff_image

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 40
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 40
GIF = b"GIF89a" + b"\x01\x00" * 20
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 30
BMP = b"BM" + b"\x00" * 12 + (40).to_bytes(4, "little") + b"\x00" * 30
TIFF_LE = b"II*\x00\x08\x00\x00\x00" + b"\x00" * 30
TIFF_BE = b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 30
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 20
AVIF = b"\x00\x00\x00\x20ftypavif\x00\x00\x00\x00avifmif1miafMA1B" + b"\x00" * 20
HEIF_AVIF_COMPAT = b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf" + b"\x00" * 10
MP4 = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 10


def write(path: Path, data: bytes = JPEG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files(root, **kwargs) -> list[str]:
    return [item.path for item in scan(root, **kwargs) if isinstance(item, FileEntry)]


def problems(root, **kwargs) -> list[tuple[str, str]]:
    return [(item.path, item.reason) for item in scan(root, **kwargs) if isinstance(item, ScanProblem)]


def rel(root: Path, paths: list[str]) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def with_timeout(fn, seconds: float = 20.0):
    """Run fn in a daemon thread and fail (instead of hanging) if it blocks."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the scan blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- sniff_image -------------------------------------------------------------------------


@pytest.mark.parametrize("data, kind", [
    (JPEG, "jpeg"), (PNG, "png"), (GIF, "gif"), (b"GIF87a" + b"\x00" * 10, "gif"), (WEBP, "webp"),
    (BMP, "bmp"), (TIFF_LE, "tiff"), (TIFF_BE, "tiff"), (HEIC, "heif"), (AVIF, "avif"),
    (HEIF_AVIF_COMPAT, "avif"), (MP4, None), (b"BM is a band name, not a bitmap header", None),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", None), (b"hello world, plain text" * 2, None), (b"\xff\xd8", None),
    (b"", None),
])
def test_sniff_image(tmp_path, data, kind):
    assert sniff_image(write(tmp_path / "f", data)) == kind


def test_sniff_image_never_blocks_on_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert with_timeout(lambda: sniff_image(fifo)) is None


def test_sniff_image_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        sniff_image(tmp_path / "nope")


# --- what counts as a candidate ----------------------------------------------------------


def test_nested_folders_in_deterministic_order(tmp_path):
    for name in ["b.jpg", "a.png", "sub2/z.gif", "sub1/deep/x.webp", "sub1/c.jpeg", "sub1/B.bmp", "m.tif"]:
        write(tmp_path / name)
    expected = ["a.png", "b.jpg", "m.tif", "sub1/B.bmp", "sub1/c.jpeg", "sub1/deep/x.webp", "sub2/z.gif"]
    assert rel(tmp_path, files(tmp_path)) == expected
    assert rel(tmp_path, files(tmp_path)) == expected  # same again


def test_entries_are_absolute_with_size_and_mtime(tmp_path, monkeypatch):
    photo = write(tmp_path / "photos" / "a.jpg", b"x" * 123)
    os.utime(photo, (1_600_000_000, 1_600_000_000.5))
    monkeypatch.chdir(tmp_path)
    (entry,) = list(scan("photos"))
    assert entry == FileEntry(str(photo), 123, 1_600_000_000.5)
    assert list(scan(os.fsencode("photos/../photos"))) == [entry]


def test_every_listed_extension_in_any_case(tmp_path):
    names = sorted(f"f{i}{ext}" for i, ext in enumerate(sorted(IMAGE_EXTENSIONS)))
    names += ["UPPER.JPG", "Mixed.JpEg", "shout.PNG", "x.HEIC"]
    for name in names:
        write(tmp_path / name, b"")
    assert sorted(rel(tmp_path, files(tmp_path, sniff=False))) == sorted(names)


def test_non_images_ignored_and_unknown_names_sniffed(tmp_path):
    write(tmp_path / "IMG_0001", JPEG)           # no extension: sniffed
    write(tmp_path / "camera.dat", PNG)          # unknown extension: sniffed
    write(tmp_path / "photo.backup", HEIC)       # unknown extension: sniffed
    write(tmp_path / "README", b"just text, not an image at all")
    write(tmp_path / "notes.txt", JPEG)          # known non-image extension: never opened
    write(tmp_path / "clip.mp4", MP4)
    write(tmp_path / "shot.dng", TIFF_LE)        # camera raw: not a supported image
    write(tmp_path / "empty", b"")
    assert rel(tmp_path, files(tmp_path)) == ["IMG_0001", "camera.dat", "photo.backup"]
    assert files(tmp_path, sniff=False) == []


def test_sniffing_opens_only_unknown_names(tmp_path, monkeypatch):
    write(tmp_path / "a.txt", JPEG)
    write(tmp_path / "b.mp4", JPEG)
    write(tmp_path / "c.jpg", b"not even an image")
    write(tmp_path / "d", JPEG)
    opened = []
    real_open = os.open
    def spy_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    assert rel(tmp_path, files(tmp_path)) == ["c.jpg", "d"]
    assert rel(tmp_path, opened) == ["d"]


def test_text_named_jpg_and_empty_jpg_are_candidates(tmp_path):
    write(tmp_path / "fake.jpg", b"I am text")
    write(tmp_path / "zero.png", b"")
    entries = {Path(e.path).name: e for e in scan(tmp_path)}
    assert entries["fake.jpg"].size == 9
    assert entries["zero.png"].size == 0


def test_hidden_files_and_folders(tmp_path):
    write(tmp_path / "seen.jpg")
    write(tmp_path / ".hidden.jpg")
    write(tmp_path / ".cache" / "thumb.jpg")
    write(tmp_path / "album" / ".secret" / "x.jpg")
    write(tmp_path / ".IMG_0002", JPEG)
    assert rel(tmp_path, files(tmp_path)) == ["seen.jpg"]
    assert rel(tmp_path, files(tmp_path, include_hidden=True)) == [
        ".IMG_0002", ".hidden.jpg", "seen.jpg", ".cache/thumb.jpg", "album/.secret/x.jpg"]


def test_hidden_root_is_scanned(tmp_path):
    write(tmp_path / ".photos" / "a.jpg")
    assert rel(tmp_path, files(tmp_path / ".photos")) == [".photos/a.jpg"]


def test_unicode_and_space_names(tmp_path):
    names = ["海边 日落.jpg", "my photo (1).PNG", "日落/夕阳 照片.webp", "café.gif"]
    for name in names:
        write(tmp_path / name)
    assert sorted(rel(tmp_path, files(tmp_path))) == sorted(names)
    for path in files(tmp_path):
        assert os.path.isfile(path)


@pytest.mark.skipif(sys.platform != "linux" or sys.getfilesystemencoding() != "utf-8",
                    reason="needs a POSIX filesystem that stores raw bytes")
def test_non_utf8_name(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9 \xff.jpg")
    with open(raw, "wb") as fh:
        fh.write(JPEG)
    (entry,) = list(scan(tmp_path))
    assert isinstance(entry.path, str)
    assert os.fsencode(entry.path) == raw
    assert os.path.getsize(entry.path) == len(JPEG)


def test_deep_tree_does_not_recurse(tmp_path):
    depth = sys.getrecursionlimit() + 100
    chain = [str(tmp_path)]
    for _ in range(depth):  # os.makedirs, Path.mkdir(parents=True) and shutil.rmtree recurse
        chain.append(os.path.join(chain[-1], "d"))
        os.mkdir(chain[-1])
    bottom = write(Path(chain[-1], "bottom.jpg"))
    try:
        assert files(tmp_path) == [str(bottom)]
    finally:  # remove it here: pytest's tmp_path cleanup would hit the recursion limit
        bottom.unlink()
        for folder in reversed(chain[1:]):
            os.rmdir(folder)


def test_scan_is_lazy(tmp_path, monkeypatch):
    for i in range(5):
        write(tmp_path / f"d{i}" / "a.jpg")
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(path) or real_scandir(path))
    items = scan(tmp_path)
    assert listed == []
    first = next(items)
    assert first.path.endswith(os.path.join("d0", "a.jpg"))
    assert len(listed) == 2  # the root and the first folder, nothing more yet


# --- symlinks ----------------------------------------------------------------------------


def test_symlinked_file_and_folder(tmp_path):
    outside = tmp_path / "outside"
    write(outside / "target.jpg", b"x" * 10)
    write(outside / "album" / "in.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.jpg").symlink_to(outside / "target.jpg")
    (root / "album_link").symlink_to(outside / "album", target_is_directory=True)
    entries = [e for e in scan(root) if isinstance(e, FileEntry)]
    assert rel(root, [e.path for e in entries]) == ["link.jpg", "album_link/in.png"]
    assert entries[0].size == 10  # the target's size, under the link's path
    assert files(root, follow_symlinks=False) == []
    assert problems(root, follow_symlinks=False) == []


def test_symlinked_root_is_followed_but_not_resolved(tmp_path):
    write(tmp_path / "real" / "a.jpg")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert files(tmp_path / "alias", follow_symlinks=False) == [str(tmp_path / "alias" / "a.jpg")]


def test_broken_symlink(tmp_path):
    write(tmp_path / "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gone_dir").symlink_to(tmp_path / "missing_dir")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")  # could never be an image: silent
    assert rel(tmp_path, files(tmp_path)) == ["ok.jpg"]
    assert problems(tmp_path) == [(str(tmp_path / "gone.jpg"), "broken symlink"),
                                  (str(tmp_path / "gone_dir"), "broken symlink")]
    assert problems(tmp_path, follow_symlinks=False) == []


def test_symlink_to_parent_is_one_loop_problem(tmp_path):
    write(tmp_path / "a.jpg")
    write(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "sub" / "self").symlink_to(tmp_path / "sub", target_is_directory=True)
    items = with_timeout(lambda: list(scan(tmp_path)))
    assert rel(tmp_path, [i.path for i in items if isinstance(i, FileEntry)]) == ["a.jpg", "sub/b.jpg"]
    assert [(p.path, p.reason) for p in items if isinstance(p, ScanProblem)] == [
        (str(tmp_path / "sub" / "self"), "symlink loop"), (str(tmp_path / "sub" / "up"), "symlink loop")]


def test_symlink_chain_loop(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    assert problems(tmp_path) == [(str(tmp_path / "a.jpg"), "symlink loop"),
                                  (str(tmp_path / "b.jpg"), "symlink loop")]


def test_folder_reached_twice_is_listed_once(tmp_path):
    write(tmp_path / "shared" / "s.jpg")
    root = tmp_path / "root"
    write(root / "real" / "r.jpg")
    (root / "a_link").symlink_to(root / "real", target_is_directory=True)  # sorts before "real"
    (root / "x1").symlink_to(tmp_path / "shared", target_is_directory=True)
    (root / "x2").symlink_to(tmp_path / "shared", target_is_directory=True)
    assert rel(root, files(root)) == ["real/r.jpg", "x1/s.jpg"]  # the real folder wins over a link
    assert [(Path(p).name, reason.split(" (")[0]) for p, reason in problems(root)] == [
        ("a_link", "folder already scanned"), ("x2", "folder already scanned")]


def test_links_cannot_blow_up_exponentially(tmp_path):
    # level i holds two links to level i+1: naive following would list 2**12 copies
    levels = [tmp_path / f"level{i}" for i in range(13)]
    for level in levels:
        level.mkdir()
    write(levels[-1] / "leaf.jpg")
    for here, below in zip(levels, levels[1:]):
        (here / "l1").symlink_to(below, target_is_directory=True)
        (here / "l2").symlink_to(below, target_is_directory=True)
    found = with_timeout(lambda: files(levels[0]))
    assert len(found) == 1


# --- special files, permissions, roots ---------------------------------------------------


def test_fifo_is_reported_not_opened(tmp_path):
    write(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "x.jpg")
    os.mkfifo(tmp_path / "noext")  # sniffable name, but never opened
    os.mkfifo(tmp_path / "pipe.txt")
    items = with_timeout(lambda: list(scan(tmp_path)))
    assert [i.path for i in items if isinstance(i, FileEntry)] == [str(tmp_path / "a.jpg")]
    assert [(p.path, p.reason) for p in items if isinstance(p, ScanProblem)] == [
        (str(tmp_path / "x.jpg"), "not a regular file (fifo)")]


def test_symlink_to_fifo_and_device(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    root = tmp_path / "root"
    root.mkdir()
    (root / "p.png").symlink_to(tmp_path / "pipe")
    (root / "null.jpg").symlink_to("/dev/null")
    items = with_timeout(lambda: problems(root))
    assert items == [(str(root / "null.jpg"), "not a regular file (character device)"),
                     (str(root / "p.png"), "not a regular file (fifo)")]


def test_unreadable_folder_is_a_problem_and_the_scan_goes_on(tmp_path, monkeypatch):
    write(tmp_path / "a" / "1.jpg")
    write(tmp_path / "locked" / "2.jpg")
    write(tmp_path / "z" / "3.jpg")
    real_scandir = os.scandir
    locked = str(tmp_path / "locked")

    def fake_scandir(path):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    items = list(scan(tmp_path))
    assert rel(tmp_path, [i.path for i in items if isinstance(i, FileEntry)]) == ["a/1.jpg", "z/3.jpg"]
    assert [(p.path, p.reason) for p in items if isinstance(p, ScanProblem)] == [(locked, "permission denied")]


def test_single_file_root(tmp_path):
    photo = write(tmp_path / "one.jpg", b"abc")
    assert list(scan(photo)) == [FileEntry(str(photo), 3, photo.stat().st_mtime)]
    notes = write(tmp_path / "notes.txt", b"named explicitly")
    assert [e.path for e in scan(notes)] == [str(notes)]


def test_missing_root_raises_at_once(tmp_path):
    with pytest.raises(AltsearchError, match="folder not found"):
        scan(tmp_path / "nope")  # no iteration needed
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(AltsearchError, match="folder not found"):
        scan(tmp_path / "dangling")


def test_special_root_raises(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(AltsearchError, match=r"not a folder: .*\(fifo\)"):
        with_timeout(lambda: scan(tmp_path / "pipe"))
    with pytest.raises(AltsearchError, match="not a valid path"):
        scan("bad\x00name")


def test_the_extension_is_what_splitext_gives(tmp_path):
    from altsearch.scan import _extension

    names = ["a.jpg", "A.JPG", ".jpg", "..jpg", "...", ".", "a.", ".a.jpg", "..a.JPEG", "a..jpg", "noext",
             "a.tar.gz", "日落.JPG", "x.jpg.", ".hidden", "a b.Png", "é.HEIC", "..a", "a.b.c.d"]
    rng = random.Random(7)
    names += ["".join(rng.choice("a.J.") for _ in range(rng.randint(1, 6))) for _ in range(500)]
    for name in names:
        assert _extension(name) == os.path.splitext(name)[1].lower(), name
