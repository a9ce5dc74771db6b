"""Ingestion end to end: altsearch's pipeline vs a naive loop, on the same checkpoint, device, dtype, threads.

A folder of ``--images`` camera-sized JPEGs (default 4000x3000, quality 90, made by
benchmarks/bench_index.py's generator and cached in ``--workdir``) is embedded several ways, each in a
fresh subprocess:

- **naive loop**: for each file, ``PIL.Image.open(p).convert("RGB")`` (full-size decode),
  ``transformers.CLIPImageProcessor`` (from the checkpoint's preprocessor_config.json) and
  ``transformers.AltCLIPModel.get_image_features``, one image at a time, vectors kept in a list;
- **altsearch**: ``Engine.open(fresh_folder, model=...)`` then ``.index(folder)``: scan, hash, reduced-size
  decode in the default number of decode workers, batched embedding, commits to the catalogue,
  the vector file saved, and the engine closed;
- on CUDA, **altsearch with torchvision**: the same with JPEGs decoded by torchvision's nvJPEG instead
  of nvImageCodec (``ALTSEARCH_GPU_JPEG=torchvision``), when both are installed; and **altsearch,
  decode="cpu"**: the same with the JPEGs decoded on the CPU;
- **altsearch int8**: the same with ``load_model(..., quantize="int8")``, when ``load_model`` takes
  that argument ("n/a" otherwise).

images/s counts from the first file to the last vector (model loading excluded: it is printed
separately, with one warm-up call: one blank image for the naive loop, a batch of the size indexing
uses for altsearch, and on a GPU two groups of photos through the GPU JPEG decoder, whose library
starts on first use); "x naive" divides by the naive loop of the same run. The cosine column compares each
file's altsearch vector (as the catalogue stores it, float16) with the naive loop's: reduced-size
decoding and float16 storage make them differ slightly. "waited" is ``IndexReport.waited``: the
seconds the run's own thread spent on decoding, the model and the commits; the largest bounds it.

Models: ``--model tiny`` (the tests' tiny random checkpoint: the model costs next to nothing, so the
figures are the pipeline's ceiling; seconds), ``--model full`` (a random checkpoint of the full
BAAI/AltCLIP architecture, written by benchmarks/bench_model.py's streaming writer, 3.5 GB, reused from
``--workdir``), or ``--model PATH`` (a local checkpoint folder). With ``full`` on a 2-core CPU the
default 8 images took 10 minutes in all on a shared VM (load average ~10): 2 minutes to write the
checkpoint (once), three model loads of 30-45 s, and 2-4 minutes per pipeline.

Run from the repository root (opt-in; tests/test_bench_ingest.py runs a tiny configuration):

    .venv/bin/python benchmarks/bench_ingest.py --workdir /tmp/bench-ingest                 # tiny, 32 images
    .venv/bin/python benchmarks/bench_ingest.py --workdir /tmp/bench-ingest --model full    # 8 images
    .venv/bin/python benchmarks/bench_ingest.py --workdir /tmp/bench-ingest --model full --device cuda \\
        --dtype fp16 --images 2000

Decode workers are started with ``spawn``, which re-imports this file in each of them: keep the top
level free of heavy imports (torch, transformers and altsearch are imported inside the functions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the tiny checkpoint comes from tests/checkpoints.py
sys.path.insert(1, str(BENCHMARKS))  # the photo generator and the full-size writer are benchmarks' own
from benchlib import checkpoint_folder, run_in_workdir  # noqa: E402

DEFAULT_IMAGES = {"tiny": 32, "full": 8}
DTYPES = ("fp32", "fp16", "bf16")
PIPELINES = ("naive", "altsearch", "altsearch-torchvision", "altsearch-cpu-decode", "altsearch-int8")
LABELS = {
    "naive": "naive loop: Pillow full decode, transformers processor + AltCLIPModel, 1 image at a time",
    "altsearch": "altsearch Engine.index",
    "altsearch-torchvision": "altsearch Engine.index, JPEGs through torchvision's nvJPEG",
    "altsearch-cpu-decode": "altsearch Engine.index, decode=\"cpu\"",
    "altsearch-int8": "altsearch Engine.index, int8 quantised model",
}


# -- inputs -----------------------------------------------------------------------------------------


def photos(work: Path, count: int, size: tuple[int, int], quality: int) -> Path:
    """The folder of generated JPEGs (made once, then reused)."""
    from bench_index import PhotoSpec, make_photos

    paths = make_photos(work, PhotoSpec(count, size[0], size[1], quality))
    return paths[0].parent




# -- the three pipelines, each in its own process ---------------------------------------------------


def _torch(job: dict):
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    return torch


def run_naive(job: dict) -> dict:
    """One image at a time through Pillow and transformers."""
    torch = _torch(job)
    from PIL import Image
    from transformers import AltCLIPModel, CLIPImageProcessor

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[job["dtype"]]
    device = torch.device(job["device"])
    paths = sorted(str(p) for p in Path(job["photos"]).glob("*.jpg"))[:job["naive_images"]]
    t0 = time.perf_counter()
    processor = CLIPImageProcessor.from_pretrained(job["ckpt"])
    model = AltCLIPModel.from_pretrained(job["ckpt"], dtype=dtype).to(device).eval()

    def embed(image) -> np.ndarray:
        pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(device, dtype)
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=pixels)
        out = getattr(out, "pooler_output", out)  # transformers 5 may return a model output
        return out.float().cpu().numpy()[0]

    embed(Image.new("RGB", (224, 224)))  # warm-up
    load_s = time.perf_counter() - t0
    cpu0, t0 = time.process_time(), time.perf_counter()
    vectors = []
    for p in paths:
        vectors.append(embed(Image.open(p).convert("RGB")))
    seconds = time.perf_counter() - t0
    return {"load_s": load_s, "seconds": seconds, "images": len(paths), "paths": paths,
            "vectors": np.stack(vectors), "cpu_s": time.process_time() - cpu0,
            "threads": torch.get_num_threads()}


def run_altsearch(job: dict) -> dict:
    """``Engine.open(fresh).index(folder)``, the model loaded beforehand."""
    torch = _torch(job)
    import inspect

    from altsearch import Engine, load_model

    options = {}
    if job["pipeline"] in ("altsearch-cpu-decode", "altsearch-torchvision") and not job["device"].startswith("cuda"):
        return {"skipped": "the same as the altsearch row without a GPU"}
    if job["pipeline"] == "altsearch-torchvision":
        from altsearch import gpudecode

        if gpudecode.jpeg_library("nvimgcodec") is None or gpudecode.jpeg_library("torchvision") is None:
            return {"skipped": "needs both nvImageCodec and torchvision (the altsearch row uses the one there is)"}
        os.environ[gpudecode.LIBRARY_ENV] = "torchvision"
    if job["quantize"] and (job["device"] != "cpu" or job["dtype"] != "fp32"):
        return {"skipped": "int8 is for fp32 on a CPU"}
    if job["quantize"]:
        if "quantize" not in inspect.signature(load_model).parameters:
            return {"skipped": "load_model has no quantize option"}
        options["quantize"] = "int8"
    t0 = time.perf_counter()
    model = load_model(job["ckpt"], device=job["device"], dtype=job["dtype"], towers=["vision"], **options)
    size = model.preprocess_config.crop_height, model.preprocess_config.crop_width
    from altsearch.ingest import default_batch_size

    batch = job["batch_size"] or default_batch_size(model)
    model.encode_pixels(np.zeros((batch, *size, 3), np.uint8))  # warm-up, at the batch size indexing uses
    if job["pipeline"] != "altsearch-cpu-decode" and job["device"].startswith("cuda"):
        _warm_gpu_decoder(model, job["photos"])
    model.fingerprint  # read once per process, as any first index does
    load_s = time.perf_counter() - t0
    folder = Path(tempfile.mkdtemp(prefix="index-", dir=job["scratch"]))
    try:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        with Engine.open(folder, model=model, device=job["device"]) as engine:
            report = engine.index(job["photos"], workers=job["workers"], batch_size=job["batch_size"],
                                  decode="cpu" if job["pipeline"] == "altsearch-cpu-decode" else "auto")
        seconds = time.perf_counter() - t0
        cpu_s = _cpu_seconds() - cpu0
        with Engine.open(folder, model=model, device=job["device"], create=False) as engine:
            cat = engine.store.catalog
            ids, vecs = (np.concatenate(parts) for parts in zip(*cat.iter_vectors()))
            paths = [r.path for r in cat.get(ids.tolist())]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if report.failed or report.embedded != len(paths):
        raise SystemExit(f"indexing failed: {report.failures[:3]}")
    decoder = f"gpu ({report.jpeg_library})" if report.decoder == "gpu" else report.decoder
    return {"load_s": load_s, "seconds": seconds, "images": len(paths), "paths": paths, "vectors": vecs,
            "cpu_s": cpu_s, "threads": torch.get_num_threads(), "batch_size": job["batch_size"],
            "workers": job["workers"], "decoder": decoder, "waited": report.waited}


def _warm_gpu_decoder(model, photos: str) -> None:
    """Start the GPU JPEG library on two groups of photos: importing torchvision and starting nvJPEG took ~6 s
    on the H100 host, and both libraries set up their batch decoding on the first whole group (a warm-up
    on one photo left ~1 s of that in the timed run)."""
    from altsearch.decode import DEFAULT_DRAFT
    from altsearch.gpudecode import GpuDecoder, gpu_decode_unavailable

    if gpu_decode_unavailable(model.device, model.preprocess_config) is None:
        with GpuDecoder(model.preprocess_config, model.device, draft=DEFAULT_DRAFT) as decoder:
            list(decoder.imap(sorted(str(p) for p in Path(photos).glob("*.jpg"))[:2 * decoder.group]))


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children (the decode workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_job(job: dict) -> None:
    result = run_naive(job) if job["pipeline"] == "naive" else run_altsearch(job)
    if "vectors" in result:
        np.save(job["vectors"], result.pop("vectors"))
    Path(job["result"]).write_text(json.dumps(result))


def spawn(job: dict) -> dict:
    """Run one pipeline in a fresh interpreter; its result, vectors included."""
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True,
                          text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {job['pipeline']} run failed with exit code {proc.returncode}")
    result = json.loads(Path(job["result"]).read_text())
    if "skipped" not in result:
        result["vectors"] = np.load(job["vectors"])
    return result


# -- comparing --------------------------------------------------------------------------------------


def cosines(ours: dict, naive: dict) -> np.ndarray:
    """Cosine between the two runs' vectors of each file (matched by path)."""
    ref = dict(zip(naive["paths"], naive["vectors"]))
    mine = dict(zip(ours["paths"], ours["vectors"]))
    common = [p for p in ours["paths"] if p in ref]  # the naive loop may have done only the first photos
    a = np.stack([ref[p] for p in common]).astype(np.float64)
    b = np.stack([mine[p] for p in common]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def summarise(results: dict[str, dict]) -> list[dict]:
    base = results["naive"]
    base_rate = base["images"] / base["seconds"]
    rows = []
    for name in PIPELINES:
        r = results[name]
        if "skipped" in r:
            rows.append({"pipeline": name, "skipped": r["skipped"]})
            continue
        rate = r["images"] / r["seconds"]
        cos = np.ones(1) if name == "naive" else cosines(r, base)
        rows.append({"pipeline": name, "images": r["images"], "load_s": r["load_s"], "seconds": r["seconds"],
                     "images_per_s": rate, "vs_naive": rate / base_rate,
                     "cpu_ms_per_image": 1e3 * r["cpu_s"] / r["images"],
                     "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                     "threads": r["threads"], "decoder": r.get("decoder", "cpu"), "waited": r.get("waited")})
    return rows


def render(rows: list[dict], info: dict) -> str:
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}; load average {info['loadavg_start']} at the start, "
        f"{info['loadavg_end']} at the end",
        f"model: {info['model']}; device {info['device']}, {info['dtype']}, {info['threads']} torch threads; "
        f"photos: {info['images']} x {info['size']} JPEG q{info['quality']} ({info['mb_each']:.2f} MB each)",
        "",
        "| pipeline | JPEGs decoded on | images | load s | seconds | images/s | x naive | CPU ms/image "
        "| cosine to naive min / mean | waited s: decode / model / commit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = LABELS[r["pipeline"]]
        if "skipped" in r:
            lines.append(f"| {label} | | | | | | | | skipped: {r['skipped']} | |")
            continue
        cos = "1 (reference)" if r["pipeline"] == "naive" else f"{r['cosine_min']:.5f} / {r['cosine_mean']:.5f}"
        waited = " / ".join(f"{r['waited'][k]:.2f}" for k in ("decode", "model", "commit")) if r["waited"] else ""
        lines.append(f"| {label} | {r['decoder'].replace('gpu', 'GPU').replace('cpu', 'CPU')} | {r['images']} | {r['load_s']:.1f} | {r['seconds']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['vs_naive']:.2f} | {r['cpu_ms_per_image']:.0f} | {cos} | {waited} |")
    return "\n".join(lines)


def machine() -> dict:
    from bench_model import machine as model_machine

    return model_machine()


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, tiny768, full or a checkpoint folder (default: tiny)")
    p.add_argument("--images", type=int, help="photos to embed (default: 32 with tiny, 8 otherwise)")
    p.add_argument("--size", default="4000x3000", help="photo size WxH (default: 4000x3000)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="default: fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every run (default: torch's)")
    p.add_argument("--naive-images", type=int, help="photos the naive loop embeds, the first ones (default: all; "
                   "on a GPU it runs at a few per second)")
    p.add_argument("--workers", type=int, help="altsearch's decode workers (default: its own choice)")
    p.add_argument("--batch-size", type=int, help="altsearch's model batch (default: its own choice)")
    p.add_argument("--workdir", type=Path, help="where photos and checkpoints are cached (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        if len(args.size) != 2 or min(args.size) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    if args.images is None:
        args.images = DEFAULT_IMAGES.get(args.model, DEFAULT_IMAGES["full"])
    if args.images < 1:
        p.error("--images must be at least 1")
    if args.naive_images is not None and not 1 <= args.naive_images <= args.images:
        p.error("--naive-images must be between 1 and --images")
    return args


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    info = machine()
    folder = photos(work, args.images, args.size, args.quality)
    ckpt = checkpoint_folder(args.model, work)
    for p in folder.iterdir():  # every run reads the photos from the page cache
        p.read_bytes()
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    common = {"ckpt": str(ckpt), "photos": str(folder), "device": args.device, "dtype": args.dtype,
              "threads": args.threads, "workers": args.workers, "batch_size": args.batch_size,
              "scratch": str(scratch), "naive_images": args.naive_images or args.images}
    results = {}
    try:
        for name in PIPELINES:
            print(f"running {name} ...", flush=True)
            results[name] = spawn({**common, "pipeline": name, "quantize": name.endswith("int8"),
                                   "result": str(scratch / f"{name}.json"), "vectors": str(scratch / f"{name}.npy")})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = summarise(results)
    info.update(model=f"{args.model} ({ckpt})", device=args.device, dtype=args.dtype,
                threads=results["naive"]["threads"], images=args.images, size=f"{args.size[0]}x{args.size[1]}",
                quality=args.quality, loadavg_end=_loadavg(),
                mb_each=sum(p.stat().st_size for p in folder.glob("*.jpg")) / args.images / 1e6)
    print("\n" + render(rows, info), flush=True)
    return {"machine": info, "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.job:
        run_job(json.loads(args.job))
        return
    run_in_workdir(args, "bench-ingest-", benchmark)


if __name__ == "__main__":
    main()
