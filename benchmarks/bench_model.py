"""altsearch's AltCLIP towers vs ``transformers.AltCLIPModel``, loaded from the same files.

Writes a random checkpoint with the full BAAI/AltCLIP architecture (864M parameters, 3.46 GB fp32
safetensors, hub key layout, the real XLM-R tokenizer) or, with ``--tiny``, the tiny test
architecture, then measures both implementations with the same dtype, device and threads:

- images/s: image features of a batch of preprocessed 224x224 pixels (median of ``--repeats``,
  after two warm-up batches);
- texts/s: text features of 32 short mixed Chinese/English queries, tokenized once (ours through
  ``Model.text_features``, which on CUDA replays a CUDA graph recorded on the second warm-up);
- one query: the first of them alone, a batch of one (what a search encodes), median milliseconds;
  ours again after ``Model.pack`` (what a long-lived process does after 16 text queries) where it
  packs (float32 on an x86-64 CPU);
- import and load time, each load in a fresh subprocess with the checkpoint evicted from the page
  cache first (``--warm-cache`` keeps it): ours with both towers and text-only, transformers'
  ``from_pretrained`` (which always loads both);
- peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh process that loads for text and
  answers one text query;
- the largest absolute difference between the two implementations' features on the same inputs;
- on CPU in fp32 (unless ``--no-int8``), altsearch once more with ``quantize="int8"``: images/s and
  texts/s against altsearch fp32 from the same run, load time (quantisation included), and the
  cosine of each int8 embedding to the fp32 one of the same input (min and mean): the drift.

Run from the repository root (not part of the test suite; tests/test_bench_model.py runs --tiny):

    .venv/bin/python benchmarks/bench_model.py                 # full size, several minutes on CPU
    .venv/bin/python benchmarks/bench_model.py --tiny          # seconds

The parent process never imports torch and generates weights in small chunks, so its memory stays
small: a child started with vfork/exec inherits its parent's peak in ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the key layout and tiny configs come from tests/checkpoints.py
sys.path.insert(1, str(ROOT / "benchmarks"))
from benchlib import cpu_name, workdir  # noqa: E402

from tests.checkpoints import (  # noqa: E402
    CLIP_PREPROCESSOR, TINY_TEXT, TINY_VISION, text_shapes, tiny_tokenizer_json, vision_shapes,
)

REAL_TOKENIZER = ROOT.parent / "shared" / "data" / "xlm-roberta" / "tokenizer.json"
CKPT_DIR = "checkpoint"

# BAAI/AltCLIP (reference spec section 1.1).
FULL_TEXT = {**TINY_TEXT, "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24,
             "num_attention_heads": 16, "intermediate_size": 4096, "project_dim": 768}
FULL_VISION = {**TINY_VISION, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
               "intermediate_size": 4096, "image_size": 224, "patch_size": 14, "projection_dim": 768}

QUERIES = [
    "海边的日落", "a cat sleeping on a sofa", "一只在沙发上睡觉的猫", "sunset over the sea",
    "雪山下的湖泊", "a red car in the rain", "城市夜景", "children playing football",
    "一碗热腾腾的拉面", "mountain lake at dawn", "故宫的红墙", "a dog running on the beach",
    "春天的樱花", "an old man reading a newspaper", "下雨天的街道", "birthday cake with candles",
    "熊猫在吃竹子", "a bowl of fresh fruit", "黄山云海", "people dancing at a wedding",
    "一杯拿铁咖啡", "snow covered pine trees", "西湖断桥", "a bicycle leaning against a wall",
    "小猫和小狗", "fireworks over the river", "长城 in winter", "sunflowers in a field",
    "夜晚的霓虹灯", "a lighthouse on a cliff", "我的毕业照", "green tea 绿茶",
]

_CHUNK = 1 << 22  # floats generated and written at a time (16 MB)
_LN_WEIGHTS = ("LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight", "pre_LN.weight",
               "pre_layrnorm.weight", "post_layernorm.weight")


# -- checkpoint -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One tensor of the checkpoint: name, shape, and how it is filled."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"  # safetensors dtype code
    fill: str = "random"  # random | zeros | arange | const


def checkpoint_specs(text: dict, vision: dict, projection_dim: int) -> list[Spec]:
    """Every tensor of a hub-layout checkpoint (what BAAI/AltCLIP ships), in file order."""
    specs = [Spec(k, tuple(s)) for k, s in {**text_shapes(text), **vision_shapes(vision)}.items()]
    specs += [Spec("text_projection.weight", (projection_dim, text["project_dim"])),
              Spec("visual_projection.weight", (projection_dim, vision["hidden_size"])),
              Spec("logit_scale", (), fill="const")]
    n_pos, d = text["max_position_embeddings"], text["hidden_size"]
    grid = vision["image_size"] // vision["patch_size"]
    specs += [Spec("text_model.roberta.embeddings.position_ids", (1, n_pos), "I64", "arange"),
              Spec("text_model.roberta.embeddings.token_type_ids", (1, n_pos), "I64", "zeros"),
              Spec("vision_model.embeddings.position_ids", (1, grid * grid + 1), "I64", "arange"),
              Spec("text_model.roberta.pooler.dense.weight", (d, d), fill="zeros"),
              Spec("text_model.roberta.pooler.dense.bias", (d,), fill="zeros")]
    return specs


def _scale(spec: Spec) -> tuple[float, float]:
    """``(offset, factor)`` of a random tensor, as tests/checkpoints.random_state_dict scales them."""
    shape = spec.shape
    if spec.name.endswith(_LN_WEIGHTS):
        return 1.0, 0.2
    if "embedding" in spec.name:
        return 0.0, 0.5
    if len(shape) > 1:
        return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))
    return 0.0, 0.1


def _chunks(spec: Spec, rng: np.random.Generator):
    """The tensor's values as little-endian bytes, at most ``_CHUNK`` elements at a time."""
    total = math.prod(spec.shape)
    if spec.fill == "const":
        yield np.asarray(2.6592, "<f4").tobytes()
        return
    if spec.fill == "arange":
        yield np.arange(total, dtype="<i8").tobytes()
        return
    offset, factor = _scale(spec)
    for start in range(0, total, _CHUNK):
        n = min(_CHUNK, total - start)
        if spec.fill == "zeros":
            yield np.zeros(n, "<i8" if spec.dtype == "I64" else "<f4").tobytes()
            continue
        x = rng.standard_normal(n, dtype=np.float32)
        x *= factor
        x += offset
        yield x.tobytes()


def write_safetensors(path: Path, specs: list[Spec], seed: int = 0) -> int:
    """Stream a safetensors file tensor by tensor (memory stays at one chunk); returns its size."""
    itemsize = {"F32": 4, "I64": 8}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        n = math.prod(s.shape) * itemsize[s.dtype]
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            for block in _chunks(s, rng):
                f.write(block)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted for the cold-cache loads
    return 8 + len(raw) + offset


def write_checkpoint(folder: Path, tiny: bool) -> Path:
    """A random AltCLIP checkpoint in ``folder``; reused when one with the same config is there."""
    if tiny:
        tok = tiny_tokenizer_json()
        text = {**TINY_TEXT, "vocab_size": len(json.loads(tok)["model"]["vocab"])}
        vision, proj = dict(TINY_VISION), 24
    else:
        if not REAL_TOKENIZER.is_file():
            raise SystemExit(f"the full-size benchmark needs the XLM-R tokenizer at {REAL_TOKENIZER}")
        tok, text, vision, proj = None, dict(FULL_TEXT), dict(FULL_VISION), 768
    config = {"architectures": ["AltCLIPModel"], "model_type": "altclip", "projection_dim": proj,
              "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": vision}
    config_text = json.dumps(config, indent=2)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if cfg_file.is_file() and weights.is_file() and cfg_file.read_text() == config_text:
        print(f"reusing the checkpoint in {folder}", flush=True)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size = write_safetensors(weights, checkpoint_specs(text, vision, proj))
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    if tok is None:
        shutil.copyfile(REAL_TOKENIZER, folder / "tokenizer.json")
    else:
        (folder / "tokenizer.json").write_text(tok, encoding="utf-8")
    cfg_file.write_text(config_text)  # last: a folder with a config is complete
    print(f"wrote a random checkpoint ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (this process's view of a cold start)."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- worker (a fresh process per measurement) -------------------------------------------------------


def _rss_mib() -> dict:
    import resource

    hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vmhwm_mib": hwm}


class Runner:
    """One implementation in this process: load it, time it, save its features."""

    def __init__(self, job: dict):
        self.job = job
        self.result: dict = {"rss_at_start_mib": _rss_mib()["maxrss_mib"]}
        t0 = time.perf_counter()
        import torch

        self.torch_import_s = time.perf_counter() - t0

        self.torch = torch
        if job["threads"]:
            torch.set_num_threads(job["threads"])
        self.result["threads"] = torch.get_num_threads()
        self.device = torch.device(job["device"])
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[job["dtype"]]
        self.model = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def load(self) -> None:
        t0 = time.perf_counter()
        if self.job["impl"] == "ours":
            import altsearch.model as ours

            self.result["import_s"] = self.torch_import_s + time.perf_counter() - t0
            t0 = time.perf_counter()
            towers = ["text"] if self.job["text_only"] else ["text", "vision"]
            self.model = ours.load_model(self.job["ckpt"], device=self.job["device"], dtype=self.job["dtype"],
                                         towers=towers, quantize=self.job.get("quantize"))
            self.image_fn = self.model.image_features
            self.text_fn = self.model.text_features
            self.result["linear"] = self.model.linear_kernel
            self.model.pack_calls = None  # packed only where timed as such (throughput)
        else:
            from transformers import AltCLIPModel

            self.result["import_s"] = self.torch_import_s + time.perf_counter() - t0
            t0 = time.perf_counter()
            self.model = AltCLIPModel.from_pretrained(self.job["ckpt"], dtype=self.dtype).to(self.device).eval()
            self.image_fn = lambda x: _tensor(self.model.get_image_features(pixel_values=x))
            self.text_fn = lambda ids, mask: _tensor(self.model.get_text_features(input_ids=ids,
                                                                                  attention_mask=mask))
        self.sync()
        self.result["load_s"] = time.perf_counter() - t0

    def prepare_inputs(self, path: Path, batch: int) -> None:
        """Tokenize the queries once and make a batch of normalised pixels (ours, written once)."""
        ids, mask = self.model.tokenizer.encode(QUERIES)
        cfg = self.model.preprocess_config
        h, w = cfg.crop_height, cfg.crop_width
        uint8 = np.random.default_rng(1).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        pixels = self.model.normalizer(self.torch.as_tensor(uint8))
        np.savez(path, ids=ids.numpy(), mask=mask.numpy(), pixels=pixels.float().numpy())

    def inputs(self, path: Path):
        data = np.load(path)
        t = self.torch
        return (t.from_numpy(data["ids"]).to(self.device), t.from_numpy(data["mask"]).to(self.device),
                t.from_numpy(data["pixels"]).to(self.device, self.dtype))

    def first_query(self, ids, mask) -> None:
        n = int(mask[0].sum())
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.text_fn(ids[:1, :n], mask[:1, :n])
            self.sync()
        self.result["first_query_s"] = time.perf_counter() - t0
        self.result.update(_rss_mib())
        if self.device.type == "cuda":
            self.result["cuda_peak_mib"] = self.torch.cuda.max_memory_allocated() / 2**20

    def timed(self, fn, repeats: int) -> tuple[list[float], list[float], object]:
        """Wall and CPU seconds of each of ``repeats`` calls after two warm-up calls, and the last output."""
        with self.torch.inference_mode():
            for _ in range(2):  # warm-up (ours records its text CUDA graphs on the second use)
                out = fn()
            self.sync()
            times, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                self.sync()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        # CPU seconds per wall second per thread: well below 1 means other processes took the cores.
        share = sum(cpu) / (sum(times) * self.result["threads"])
        self.result["cpu_share"] = min(self.result.get("cpu_share", 1.0), share)
        return times, cpu, out

    def throughput(self, ids, mask, pixels, out: Path) -> None:
        impl, repeats = self.job.get("tag", self.job["impl"]), self.job["repeats"]
        times, cpu, feats = self.timed(lambda: self.image_fn(pixels), repeats)
        self.result.update(image_times=times, images_per_s=len(pixels) / statistics.median(times),
                           cpu_s_per_image=statistics.median(cpu) / len(pixels))
        np.save(out / f"{impl}_image.npy", feats.float().cpu().numpy())
        times, cpu, feats = self.timed(lambda: self.text_fn(ids, mask), repeats)
        self.result.update(text_times=times, texts_per_s=len(ids) / statistics.median(times),
                           cpu_s_per_text=statistics.median(cpu) / len(ids), tokens=int(ids.shape[1]))
        np.save(out / f"{impl}_text.npy", feats.float().cpu().numpy())
        n = int(mask[0].sum())  # one search query: a batch of one short text
        query = lambda: self.text_fn(ids[:1, :n], mask[:1, :n])  # noqa: E731
        times, cpu, _ = self.timed(query, max(repeats, 5))
        self.result.update(query_times=times, query_ms=1000 * statistics.median(times), query_tokens=n)
        if self.job["impl"] == "ours" and self.model.pack(["text"]).packed_layers:  # a long-lived process's state
            times, _, _ = self.timed(query, max(repeats, 5))
            self.result.update(query_packed_ms=1000 * statistics.median(times),
                               pack_s=self.model.load_seconds["text_pack"])


def _tensor(out):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return getattr(out, "pooler_output", out)


def run_worker(job: dict) -> None:
    runner = Runner(job)
    runner.load()
    out, inputs = Path(job["out"]), Path(job["inputs"])
    if job["prepare"]:
        runner.prepare_inputs(inputs, job["batch"])
    ids, mask, pixels = runner.inputs(inputs)
    if job["query"]:
        runner.first_query(ids, mask)
    if job["throughput"]:
        runner.throughput(ids, mask, pixels, out)
    Path(job["result"]).write_text(json.dumps(runner.result))


def spawn(job: dict, cold: bool) -> dict:
    """Run one job in a fresh interpreter and return what it measured."""
    if cold:
        evict(Path(job["ckpt"]))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {job['impl']} failed with exit code {proc.returncode}")
    return json.loads(Path(job["result"]).read_text())


# -- report -----------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = cpu_name()

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": version("torch"), "transformers": version("transformers"),
            "date": datetime.date.today().isoformat(), "loadavg_start": _loadavg()}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def rows(ours_both: dict, ours_text: dict, theirs: dict, diffs: dict, batch: int) -> list[tuple]:
    """(metric, ours, theirs, ratio, unit format); ratio > 1 means altsearch is better."""
    tp = lambda a, b: a / b  # noqa: E731 - higher is better
    tm = lambda a, b: b / a  # noqa: E731 - lower is better
    out = [
        (f"images/s (batch {batch}, median)", ours_both["images_per_s"], theirs["images_per_s"], tp, "{:.3f}"),
        (f"texts/s (batch {len(QUERIES)} x {theirs['tokens']} tokens, median)", ours_both["texts_per_s"],
         theirs["texts_per_s"], tp, "{:.2f}"),
        (f"one text query (batch 1 x {theirs['query_tokens']} tokens, median ms)", ours_both["query_ms"],
         theirs["query_ms"], tm, "{:.1f}"),
    ]
    if "query_packed_ms" in ours_both:
        out.append((f"one text query, text weights packed (ms; packing took {ours_both['pack_s']:.1f} s)",
                    ours_both["query_packed_ms"], theirs["query_ms"], tm, "{:.1f}"))
    out += [
        ("import time, torch included (s)", ours_both["import_s"], theirs["import_s"], tm, "{:.2f}"),
        ("load, both towers (s)", ours_both["load_s"], theirs["load_s"], tm, "{:.2f}"),
        ("load, text tower only (s) [theirs: both]", ours_text["load_s"], theirs["load_s"], tm, "{:.2f}"),
        ("load + first text query (s)", ours_text["load_s"] + ours_text["first_query_s"],
         theirs["load_s"] + theirs["first_query_s"], tm, "{:.2f}"),
        ("peak RSS, text load + 1 query (MiB)", ours_text["maxrss_mib"], theirs["maxrss_mib"], tm, "{:.0f}"),
    ]
    if "cuda_peak_mib" in theirs:
        out.append(("peak GPU memory, text load + 1 query (MiB)", ours_text["cuda_peak_mib"],
                    theirs["cuda_peak_mib"], tm, "{:.0f}"))
    out += [("max |ours - theirs|, image features", diffs["image"], None, None, "{:.2e}"),
            ("max |ours - theirs|, text features", diffs["text"], None, None, "{:.2e}")]
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) feature arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def int8_rows(int8: dict, fp32: dict, drift: dict, batch: int) -> list[tuple]:
    """(metric, int8, fp32, ratio, format) for ``quantize="int8"`` against fp32, both altsearch."""
    tp = lambda a, b: a / b  # noqa: E731
    tm = lambda a, b: b / a  # noqa: E731
    return [
        (f"images/s (batch {batch}, median)", int8["images_per_s"], fp32["images_per_s"], tp, "{:.3f}"),
        (f"texts/s (batch {len(QUERIES)} x {int8['tokens']} tokens, median)", int8["texts_per_s"],
         fp32["texts_per_s"], tp, "{:.2f}"),
        # CPU time barely depends on what else runs: the fairer ratio on a shared machine.
        ("CPU seconds per image (median batch)", int8["cpu_s_per_image"], fp32["cpu_s_per_image"], tm, "{:.2f}"),
        ("CPU seconds per text (median batch)", int8["cpu_s_per_text"], fp32["cpu_s_per_text"], tm, "{:.3f}"),
        (f"one text query (batch 1 x {int8['query_tokens']} tokens, median ms)", int8["query_ms"],
         fp32["query_ms"], tm, "{:.1f}"),
        ("load, both towers, quantisation included (s)", int8["load_s"], fp32["load_s"], tm, "{:.2f}"),
        ("cosine to fp32, image embeddings: min", drift["image"][0], None, None, "{:.5f}"),
        ("cosine to fp32, image embeddings: mean", drift["image"][1], None, None, "{:.5f}"),
        ("cosine to fp32, text embeddings: min", drift["text"][0], None, None, "{:.5f}"),
        ("cosine to fp32, text embeddings: mean", drift["text"][1], None, None, "{:.5f}"),
    ]


def _table(header: tuple, table: list[tuple]) -> list[str]:
    lines = [(m, fmt.format(a), "reference" if b is None else fmt.format(b),
              "" if f is None else f"{f(a, b):.2f}x") for m, a, b, f, fmt in table]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)),
           "-|-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in lines]
    return out


def render(table: list[tuple], info: dict, int8: list[tuple] | None = None) -> str:
    out = _table(("metric", "altsearch", "transformers", "ratio (>1: altsearch better)"), table)
    if int8:
        out += ["", f"altsearch quantize=\"int8\" vs altsearch fp32 (CPU share of the int8 batches "
                f"{info['cpu_share_int8']:.2f})", ""]
        out += _table(("metric", "altsearch int8", "altsearch fp32", "ratio (>1: int8 better)"), int8)
    return "\n".join([
        f"machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}; {info['threads']} threads; {info['device']} {info['dtype']}; "
        f"{info['date']}",
        f"checkpoint: {info['checkpoint']}; loads {'from a cold page cache' if info['cold'] else 'warm'}; "
        f"load average {info['loadavg_start']} (start) -> {info['loadavg_end']} (end)",
        f"CPU share of the timed batches (1.00: the cores were ours): altsearch {info['cpu_share'][0]:.2f}, "
        f"transformers {info['cpu_share'][1]:.2f}",
        f"altsearch's Linear layers: {info['linear']} (fp32 CPU: onednn unless ALTSEARCH_ONEDNN=0)",
        "ratio: throughput ours/theirs, time and memory theirs/ours",
        "", *out])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny architecture (a smoke test, seconds)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="default: fp32")
    p.add_argument("--batch", type=int, default=8, help="images per timed batch (default: 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches after the warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--workdir", type=Path, help="where the checkpoint and results go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (reused by a later --workdir run)")
    p.add_argument("--warm-cache", action="store_true", help="do not evict the checkpoint before each load")
    p.add_argument("--no-int8", action="store_true", help="skip the quantize=\"int8\" run (CPU fp32 only)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be at least 1")
    return args


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    info = machine()
    ckpt = write_checkpoint(work / CKPT_DIR, args.tiny)
    common = {"ckpt": str(ckpt), "inputs": str(work / "inputs.npz"), "out": str(work), "device": args.device,
              "dtype": args.dtype, "threads": args.threads, "batch": args.batch, "repeats": args.repeats}
    cold = not args.warm_cache
    jobs = {  # order matters: ours_both writes the inputs the others read
        "ours_both": dict(impl="ours", text_only=False, prepare=True, query=False, throughput=True),
        "ours_text": dict(impl="ours", text_only=True, prepare=False, query=True, throughput=False),
        "theirs": dict(impl="theirs", text_only=False, prepare=False, query=True, throughput=True),
    }
    int8 = args.device == "cpu" and args.dtype == "fp32" and not args.no_int8
    if int8:  # right after ours_both, so both altsearch runs see the machine in a similar state
        jobs = {"ours_both": jobs.pop("ours_both"),
                "ours_int8": dict(impl="ours", tag="int8", quantize="int8", text_only=False, prepare=False,
                                  query=False, throughput=True), **jobs}
    res = {}
    for name, job in jobs.items():
        print(f"running {name} ...", flush=True)
        res[name] = spawn({**common, **job, "result": str(work / f"{name}.json")}, cold)
    diffs = {kind: float(np.abs(np.load(work / f"ours_{kind}.npy") - np.load(work / f"theirs_{kind}.npy")).max())
             for kind in ("image", "text")}
    info.update(threads=res["theirs"]["threads"], device=args.device, dtype=args.dtype, cold=cold,
                checkpoint="tiny random" if args.tiny else "random, BAAI/AltCLIP architecture (864M parameters)",
                loadavg_end=_loadavg(), cpu_share=(res["ours_both"]["cpu_share"], res["theirs"]["cpu_share"]),
                linear=res["ours_both"]["linear"])
    table = rows(res["ours_both"], res["ours_text"], res["theirs"], diffs, args.batch)
    report = {"machine": info, "runs": res, "max_abs_diff": diffs,
              "table": [{"metric": m, "altsearch": a, "transformers": b, "ratio": None if f is None else f(a, b)}
                        for m, a, b, f, _ in table]}
    qtable = None
    if int8:
        cos = {kind: cosines(np.load(work / f"int8_{kind}.npy"), np.load(work / f"ours_{kind}.npy"))
               for kind in ("image", "text")}
        drift = {kind: (float(c.min()), float(c.mean())) for kind, c in cos.items()}
        info["cpu_share_int8"] = res["ours_int8"]["cpu_share"]
        qtable = int8_rows(res["ours_int8"], res["ours_both"], drift, args.batch)
        report["int8"] = {"cosine_min_mean": drift,
                          "table": [{"metric": m, "int8": a, "fp32": b, "ratio": None if f is None else f(a, b)}
                                    for m, a, b, f, _ in qtable]}
    print("\n" + render(table, info, qtable))
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    kept = args.workdir or (Path(tempfile.mkdtemp(prefix="bench-model-")) if args.keep else None)
    with workdir(kept, "bench-model-") as work:
        try:
            report = benchmark(args, work)
        finally:
            if not args.keep:
                shutil.rmtree(work / CKPT_DIR, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
