"""Indexing throughput of altsearch's pipeline by setting: reduced-size JPEG decoding x decode workers.

An ablation of the pipeline's two decode settings (benchmarks/bench_ingest.py compares the whole
pipeline with a naive Pillow + transformers loop; docs/indexing.md explains both and holds figures).
A folder of camera-sized JPEGs (default 48 at 4000x3000, quality 90: smooth gradients, shapes, mild
grain, an EXIF date; generated once and cached in ``--workdir``) is indexed into a fresh index per
configuration with ``Engine.open(dir, model=..., device=...).index(folder, workers=W, draft=D)``:
reduced-size JPEG decoding (draft) on and off x decode workers (default 0, 1, 2), after one warm-up
run on two of the photos. images/s is ``report.embedded / report.seconds`` (median over ``--repeats``
rounds, configurations interleaved); "x base" divides by the baseline (draft off, 0 workers) of the
same run; CPU ms/image is the user + system time of this process and its decode workers. With the
tiny random model (the default) the model costs next to nothing, so the figures are the
scan-decode-commit pipeline's ceiling; ``--model`` runs a real checkpoint instead.

Run from the repository root (opt-in; tests/test_bench_index.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_index.py --workdir /tmp/bench-index --repeats 3

Decode workers are started with ``spawn``, which re-imports this file in each of them: keep the
top level free of heavy imports (torch and altsearch are imported inside the functions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny checkpoint comes from tests/checkpoints.py
sys.path.insert(1, str(ROOT / "benchmarks"))
from benchlib import cpu_name, int_list, loadavg, workdir  # noqa: E402

RENDER_SCALE = 8  # photo content is drawn at 1/8 size and upscaled: smooth and fast to make
GRAIN = 8  # +- grey levels of the fine and of the coarse grain added at full size


# -- photos -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoSpec:
    count: int
    width: int
    height: int
    quality: int

    @property
    def folder_name(self) -> str:
        return f"photos-{self.width}x{self.height}-q{self.quality}-n{self.count}"


class PhotoRenderer:
    """Camera-sized pictures: a gradient with shapes, drawn small, blurred, upscaled, grain added."""

    def __init__(self, width: int, height: int, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.size = (width, height)
        levels = 2 * GRAIN + 1
        self.fine = Image.fromarray(rng.integers(0, levels, (height, width, 3), dtype=np.uint8))
        small = rng.integers(0, levels, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
        self.coarse = Image.fromarray(small).resize(self.size, Image.Resampling.BILINEAR)

    def render(self, seed: int):
        from PIL import Image, ImageChops, ImageDraw, ImageFilter

        rng = np.random.default_rng(seed)
        width, height = self.size
        w, h = max(8, width // RENDER_SCALE), max(8, height // RENDER_SCALE)
        top, bottom, side = rng.integers(0, 256, (3, 3))
        y = np.linspace(0, 1, h)[:, None, None]
        x = np.linspace(0, 1, w)[None, :, None]
        mix = rng.uniform(0.2, 0.8)
        sky = top * (1 - y) + bottom * y * mix + side * x * (1 - mix)  # (h, w, 3)
        img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
            x1, y1 = x0 + int(rng.integers(w // 12 + 1, w // 2 + 2)), y0 + int(rng.integers(h // 12 + 1, h // 2 + 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        img = img.filter(ImageFilter.GaussianBlur(1.5)).resize(self.size, Image.Resampling.BICUBIC)
        for grain in (self.fine, self.coarse):
            shifted = ImageChops.offset(grain, int(rng.integers(0, width)), int(rng.integers(0, height)))
            img = ImageChops.add(img, shifted, offset=-GRAIN)
        return img


def make_photos(workdir: Path, spec: PhotoSpec, jobs: int | None = None) -> list[Path]:
    """The spec's JPEGs under ``workdir``; files already there are reused, missing ones made in ``jobs``
    processes (default: one per core; a 12 Mpx photo takes about half a second to draw and encode)."""
    folder = workdir / spec.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"IMG_{i:04d}.jpg" for i in range(spec.count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if not missing:
        return paths
    t0 = time.perf_counter()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(missing)))
    shares = [missing[k::jobs] for k in range(jobs)]
    if jobs == 1:
        _render_photos(folder, spec, shares[0])
    else:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            list(pool.map(_render_photos, [folder] * jobs, [spec] * jobs, shares))
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    print(f"made {len(missing)} photos in {folder} ({time.perf_counter() - t0:.1f} s, {jobs} processes, "
          f"{mb:.2f} MB each)", flush=True)
    return paths


def _render_photos(folder: Path, spec: PhotoSpec, numbers: list[int]) -> None:
    """Draw and save the photos of these numbers (one process's share of :func:`make_photos`)."""
    from tests.photos import exif_bytes

    renderer = PhotoRenderer(spec.width, spec.height)
    for i in numbers:
        path = folder / f"IMG_{i:04d}.jpg"
        taken = datetime.datetime(2020 + i % 5, 1 + i % 12, 1 + i % 28, 8 + i % 12, i % 60)
        tmp = path.with_name("." + path.name + ".tmp")  # hidden: never scanned
        renderer.render(i).save(tmp, "JPEG", quality=spec.quality,
                                exif=exif_bytes(taken, "Benchmark", "Synthetic 12MP"))
        os.replace(tmp, path)


# -- models -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """What an index records about its model, and what Engine.open is given."""

    source: str  # passed as Engine.open(model=...)
    model_id: str  # the catalogue's model_id (Model.source)
    fingerprint: str
    dimension: int


def model_ref(source: str) -> ModelRef:
    from altsearch import load_model

    model = load_model(source, device="cpu")
    return ModelRef(source, model.source, model.fingerprint, model.dimension)


def tiny_model(workdir: Path) -> ModelRef:
    """The tests' tiny random checkpoint (24-d joint space), written once into ``workdir``."""
    from tests.checkpoints import write_checkpoint

    folder = workdir / "tiny-altclip"
    if not (folder / "config.json").is_file():
        write_checkpoint(folder, seed=0)
    return model_ref(str(folder))


# -- 1. indexing ------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the decode workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def index_once(photos: Path, scratch: Path, model: str, device: str, *, draft: bool, workers: int,
               batch_size: int | None):
    """Index ``photos`` into a fresh index folder; returns (IndexReport, CPU seconds it took)."""
    from altsearch import Engine

    folder = Path(tempfile.mkdtemp(prefix="index-", dir=scratch))
    try:
        with Engine.open(folder, model=model, device=device) as engine:
            engine.model.load(["vision"])  # the weights are read before the clock starts
            cpu = _cpu_seconds()
            report = engine.index(photos, workers=workers, draft=draft, batch_size=batch_size)
            return report, _cpu_seconds() - cpu  # the pool has joined its workers by now
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_indexing(args: argparse.Namespace, photos: Path, count: int, model: ModelRef, work: Path) -> list[dict]:
    configs = [(draft, w) for draft in (False, True) for w in args.workers]
    base = (False, 0) if 0 in args.workers else configs[0]
    rates: dict[tuple[bool, int], list[float]] = {c: [] for c in configs}
    seconds: dict[tuple[bool, int], list[float]] = {c: [] for c in configs}
    cpu: dict[tuple[bool, int], list[float]] = {c: [] for c in configs}
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    _read_all(photos)  # every configuration reads the files from the page cache
    warmup = scratch / "warmup"  # first-use costs (lazy imports, torch kernels) are not the baseline's
    warmup.mkdir()
    for p in sorted(photos.glob("*.jpg"))[:2]:
        shutil.copyfile(p, warmup / p.name)
    index_once(warmup, scratch, model.source, args.device, draft=True, workers=0, batch_size=args.batch_size)
    for round_ in range(args.repeats):
        for draft, workers in configs:
            report, cpu_s = index_once(photos, scratch, model.source, args.device, draft=draft, workers=workers,
                                       batch_size=args.batch_size)
            if report.embedded != count or report.failed:
                raise SystemExit(f"indexing embedded {report.embedded} of {count} photos, "
                                 f"{report.failed} failed: {report.failures[:3]}")
            rates[(draft, workers)].append(report.embedded / report.seconds)
            seconds[(draft, workers)].append(report.seconds)
            cpu[(draft, workers)].append(cpu_s)
            print(f"  round {round_ + 1}: draft {'on ' if draft else 'off'} workers {workers}: "
                  f"{report.embedded / report.seconds:6.2f} images/s, {1e3 * cpu_s / count:.0f} CPU ms/image",
                  flush=True)
    base_rate = statistics.median(rates[base])
    return [{"draft": draft, "workers": workers, "images": count,
             "seconds": statistics.median(seconds[(draft, workers)]),
             "images_per_s": statistics.median(rates[(draft, workers)]),
             "vs_base": statistics.median(rates[(draft, workers)]) / base_rate,
             "cpu_ms_per_image": 1e3 * statistics.median(cpu[(draft, workers)]) / count,
             "runs": rates[(draft, workers)]}
            for draft, workers in configs]


def _read_all(folder: Path) -> None:
    for p in sorted(folder.iterdir()):
        if p.is_file():
            p.read_bytes()


# -- report -----------------------------------------------------------------------------------------


def machine(args: argparse.Namespace) -> dict:
    import faiss
    import PIL
    import torch
    from PIL import features

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_name()
    mem = 0.0
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
        "memory_gib": round(mem, 1), "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "pillow": PIL.__version__, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "numpy": np.__version__, "sqlite": sqlite3.sqlite_version, "device": args.device,
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "MKL_", "OPENBLAS_"))},
        "altsearch_commit": _commit(), "loadavg_start": loadavg(),
    }


def _commit() -> str | None:
    """The repository's HEAD, with "+dirty" when altsearch/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "altsearch"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def render_machine(info: dict) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
            f"{info['memory_gib']} GiB; load average {info['loadavg_start']} at start, {info.get('loadavg_end')} "
            f"at end\nsoftware: Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads, "
            f"device {info['device']}), faiss {info['faiss']} ({info['faiss_gpus']} GPUs), Pillow {info['pillow']} "
            f"(libjpeg-turbo: {info['libjpeg_turbo']}), numpy {info['numpy']}, SQLite {info['sqlite']}; "
            f"OpenMP/BLAS environment {info['omp_env'] or 'unset'}; altsearch {info['altsearch_commit']}; "
            f"{info['date']}")


def render_indexing(rows: list[dict], photo: dict) -> str:
    lines = [f"indexing {rows[0]['images']} JPEGs of {photo['width']}x{photo['height']} "
             f"({photo['mb_each']:.2f} MB each), model {photo['model']}, batch size {photo['batch_size']}",
             "", "| reduced-size decoding | workers | seconds | images/s | x base | CPU ms/image |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['draft'] else 'off'} | {r['workers']} | {r['seconds']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['vs_base']:.2f} | {r['cpu_ms_per_image']:.0f} |")
    best = max(rows, key=lambda r: r["images_per_s"])
    base = next(r for r in rows if r["vs_base"] == 1.0)
    lines += ["", f"summary: best {best['images_per_s']:.1f} images/s (reduced-size decoding "
                  f"{'on' if best['draft'] else 'off'}, {best['workers']} workers) = {best['vs_base']:.2f}x the "
                  f"baseline ({base['images_per_s']:.1f} images/s, decoding off, {base['workers']} workers)"]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------



def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError("photos must be at least 16x16")
    return w, h


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="cache for photos and checkpoints "
                                                "(kept; default: a temporary folder, removed)")
    p.add_argument("--images", type=int, default=48, help="photos to index (default: 48)")
    p.add_argument("--size", type=_size, default=(4000, 3000), help="photo size WxH (default: 4000x3000)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    p.add_argument("--workers", type=int_list(0), default=[0, 1, 2], help="decode workers to try (default: 0,1,2)")
    p.add_argument("--batch-size", type=int, help="images per model batch (default: the library's)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the indexing configurations (median)")
    p.add_argument("--model", help="a real checkpoint (hub id or folder) instead of the tiny random one")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        p.error("--images and --repeats must be at least 1")
    return args


def run(args: argparse.Namespace, work: Path) -> dict:
    info = machine(args)
    print(render_machine(info), flush=True)
    model = model_ref(args.model) if args.model else tiny_model(work)
    spec = PhotoSpec(args.images, *args.size, args.quality)
    paths = make_photos(work, spec)
    print("indexing ...", flush=True)
    rows = bench_indexing(args, paths[0].parent, len(paths), model, work)
    photo = {"width": spec.width, "height": spec.height, "quality": spec.quality,
             "mb_each": sum(p.stat().st_size for p in paths) / len(paths) / 1e6,
             "model": "tiny random" if not args.model else args.model, "batch_size": args.batch_size or "default"}
    info["loadavg_end"] = loadavg()
    print("\n" + render_machine(info))
    print("\n" + render_indexing(rows, photo))
    return {"machine": info, "model": model.model_id, "photos": photo, "indexing": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    with workdir(args.workdir, "bench-index-") as work:
        try:
            report = run(args, work)
        finally:
            shutil.rmtree(work / "scratch", ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
