"""Ingestion's decoding stages, each measured alone on the same camera-sized JPEGs.

benchmarks/bench_ingest.py times the whole pipeline; this script takes it apart, to show which stage
bounds it on a machine. The photos (default 32 at 4000x3000, quality 90, bench_index.py's generator,
cached in ``--workdir``) are read once beforehand, so every stage reads them from the page cache:

- ``naive``, the baseline: Pillow decodes each photo in full and converts it to RGB, one at a time
  (what the naive loop of bench_ingest.py does before its processor);
- ``readers``: the GPU decoder's reader threads (``--readers``, default its own) read each file,
  hash it and parse its header and EXIF, once per content hash (SHA-256 for new indexes, BLAKE2b
  for older ones);
- ``cpu decode``: :class:`altsearch.decode.DecodePool` reads, hashes and decodes each photo at reduced
  size and crops it, in ``--workers`` processes (default: one per core but one);
- on CUDA, for each JPEG library installed (nvImageCodec, torchvision's nvJPEG): the library alone
  on the photos' bytes in groups of 64, 32 and 1, and the whole
  :class:`altsearch.gpudecode.GpuDecoder` with it (readers, decoding, resize and crop).

Each row: photos/s over all the photos after a warm-up on two, "x naive" against the baseline of the
same run, and the CPU time of this process and its workers per photo.

Run from the repository root (opt-in; tests/test_bench_decode.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_decode.py --workdir /tmp/bench-decode
    .venv/bin/python benchmarks/bench_decode.py --device cuda --images 2000   # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
from bench_index import PhotoSpec, _size, make_photos, machine, render_machine  # noqa: E402
from benchlib import loadavg, run_in_workdir  # noqa: E402

LIBRARY_GROUPS = (64, 32, 1)


def _cpu_seconds(pids: Callable[[], list[int]]) -> float:
    """User + system CPU time of this process, of its children that have ended and of the live
    processes ``pids`` names (read from /proc; where there is none, they count as nothing)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    for pid in pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def timed(name: str, setting: str, paths: list[str], stage: Callable[[list[str]], int], sync=lambda: None) -> dict:
    """One row: ``stage`` run on two photos (warm-up), then on all of them; it returns how many came out.
    A stage with worker processes names them in ``stage.pids()``."""
    pids = getattr(stage, "pids", list)
    stage(paths[:2])
    sync()
    t0, c0 = time.perf_counter(), _cpu_seconds(pids)
    done = stage(paths)
    sync()
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - c0
    if done != len(paths):
        raise SystemExit(f"{name}: {done} of {len(paths)} photos came out")
    print(f"  {name} ({setting}): {len(paths) / seconds:.1f} photos/s", flush=True)
    return {"stage": name, "setting": setting, "photos": len(paths), "seconds": seconds,
            "photos_per_s": len(paths) / seconds, "cpu_ms_per_photo": 1e3 * cpu / len(paths)}


def naive(paths: list[str]) -> int:
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB")
    return len(paths)


def readers(cfg, readers: int | None, hash_kind: str) -> Callable[[list[str]], int]:
    from altsearch.gpudecode import GpuDecoder, JpegLibrary

    none = JpegLibrary("none", lambda datas, device: [])  # only the readers run here
    decoder = GpuDecoder(cfg, "cpu", readers=readers, hash_kind=hash_kind, library=none)

    def stage(paths: list[str]) -> int:
        with ThreadPoolExecutor(decoder.readers, thread_name_prefix="bench-read") as pool:
            return sum(1 for _ in pool.map(decoder._read, paths))  # the decoder's own reader step

    stage.threads = decoder.readers
    return stage


def cpu_decode(cfg, workers: int) -> Callable[[list[str]], int]:
    from altsearch.decode import DEFAULT_DRAFT, DecodePool

    pool = DecodePool(cfg, workers=workers, draft=DEFAULT_DRAFT)  # started by the warm-up, closed by main

    def stage(paths: list[str]) -> int:
        return sum(1 for d in pool.imap(paths) if d.ok)

    stage.pool = pool
    stage.pids = lambda: list(pool._executor._processes) if pool._executor is not None else []
    return stage


def gpu_rows(cfg, paths: list[str], device: str) -> list[dict]:
    """For each JPEG library that loads (nvImageCodec, torchvision): the library alone in groups, then
    the whole GPU decoder with it; [] where there is no CUDA or no library."""
    import torch

    from altsearch.gpudecode import LIBRARIES, GpuDecoder, gpu_decode_unavailable, jpeg_library

    why = gpu_decode_unavailable(torch.device(device), cfg)
    if why:
        print(f"  (no GPU decoding rows: {why})", flush=True)
        return []
    target = torch.device(device)
    datas = {p: Path(p).read_bytes() for p in paths}
    sync = torch.cuda.synchronize
    rows = []
    for library in filter(None, map(jpeg_library, LIBRARIES)):
        for group in LIBRARY_GROUPS:
            def alone(part: list[str], group=group, decode=library.decode) -> int:
                for i in range(0, len(part), group):
                    decode([datas[p] for p in part[i:i + group]], target)  # the call the GPU decoder makes
                return len(part)

            rows.append(timed(f"{library.name} alone", f"groups of {group}", paths, alone, sync))
        with GpuDecoder(cfg, device, library=library) as decoder:
            row = timed(f"GPU decoder, whole, {library.name}",
                        f"{_plural(decoder.readers, 'reader thread')}, "
                        f"{_plural(decoder.decoding_threads, 'decoding thread')}, groups of {decoder.group}",
                        paths, lambda part: sum(1 for d in decoder.imap(part) if d.ok), sync)
        row["waited"] = dict(decoder.waited)  # warm-up included: which side the caller waited on
        print(f"    its caller waited {decoder.waited['read']:.2f} s for the readers, "
              f"{decoder.waited['gpu']:.2f} s for decoded groups", flush=True)
        rows.append(row)
    return rows


def bench(args: argparse.Namespace, work: Path) -> dict:
    from altsearch.decode import HASH_KINDS
    from altsearch.model.preprocess import PreprocessConfig

    info = machine(args)
    print(render_machine(info), flush=True)
    spec = PhotoSpec(args.images, *args.size, args.quality)
    paths = [str(p) for p in make_photos(work, spec)]
    for p in paths:  # into the page cache: every stage reads from memory
        Path(p).read_bytes()
    cfg = PreprocessConfig()
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    rows = [timed("naive", "Pillow full decode, 1 process", paths, naive)]
    for kind in HASH_KINDS:
        stage = readers(cfg, args.readers, kind)
        rows.append(timed(f"readers, {kind}", _plural(stage.threads, "thread"), paths, stage))
    stage = cpu_decode(cfg, workers)
    try:
        rows.append(timed("cpu decode", _plural(workers, "process") if workers else "in this process", paths, stage))
    finally:
        stage.pool.close()
    if args.device != "cpu":
        rows += gpu_rows(cfg, paths, args.device)
    base = rows[0]["photos_per_s"]
    for r in rows:
        r["x_naive"] = r["photos_per_s"] / base
    mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
    photo = {"count": len(paths), "width": spec.width, "height": spec.height, "quality": spec.quality,
             "mb_each": mb}
    info["loadavg_end"] = loadavg()
    print("\n" + render_machine(info))
    print("\n" + render(rows, photo))
    return {"machine": info, "photos": photo, "stages": rows}


def render(rows: list[dict], photo: dict) -> str:
    lines = [f"decoding {photo['count']} JPEGs of {photo['width']}x{photo['height']} ({photo['mb_each']:.2f} MB "
             "each), each stage alone, from the page cache", "",
             "| stage | setting | photos/s | x naive | CPU ms/photo |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['setting']} | {r['photos_per_s']:.1f} | {r['x_naive']:.2f} | "
                     f"{r['cpu_ms_per_photo']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="cache for the photos (kept; default: a temporary folder, removed)")
    p.add_argument("--images", type=int, default=32, help="photos (default: 32)")
    p.add_argument("--size", type=_size, default=(4000, 3000), help="photo size WxH (default: 4000x3000)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    p.add_argument("--readers", type=int, help="reader threads (default: the GPU decoder's own)")
    p.add_argument("--workers", type=int, help="decode processes for the CPU row (default: cores - 1, at least 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: adds the GPU rows (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.images < 2:
        p.error("--images must be at least 2")
    if (args.readers is not None and args.readers < 1) or (args.workers is not None and args.workers < 0):
        p.error("--readers must be at least 1 and --workers at least 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run_in_workdir(args, "bench-decode-", bench)


if __name__ == "__main__":
    main()
