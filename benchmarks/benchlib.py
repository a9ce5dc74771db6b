"""What the benchmark scripts share: their working folder and their integer-list options.

Kept free of heavy imports: scripts that start decode workers with ``spawn`` import it again in
every worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    """`path` (created if missing, kept afterwards), or a new temporary folder removed afterwards."""
    work = path or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if path is None:
            shutil.rmtree(work, ignore_errors=True)


def run_in_workdir(args: argparse.Namespace, prefix: str, run: Callable[[argparse.Namespace, Path], dict]) -> dict:
    """``run(args, work)`` in the ``--workdir`` folder (or a temporary one, see :func:`workdir`); its report
    is also written to ``--json`` when given."""
    with workdir(args.workdir, prefix) as work:
        report = run(args, work)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


# The start of a measured run's code (a fresh interpreter, `python -c`): it ends with done(), one JSON
# line with what it found and what it cost. Peak memory is VmHWM: getrusage's ru_maxrss survives exec,
# so a child would report its parent's peak.
DONE_CODE = """
import json, sys, time

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

def done(**found):
    print(json.dumps({**found, "torch": "torch" in sys.modules, "cpu_s": time.process_time(),
                      "rss_mb": peak_mb()}))
"""


def made_before(spec_file: Path, want: dict, *made: Path) -> dict | None:
    """What ``spec_file`` records of something a benchmark makes once in its workdir (written last, so its
    presence means the thing is complete), if it was made with ``want``'s settings and the folders
    ``made`` are there; else None, with the spec file removed before the thing is made again."""
    if spec_file.is_file():
        info = json.loads(spec_file.read_text())
        if {k: info.get(k) for k in want} == want and all(p.is_dir() for p in made):
            print(f"reusing {made[0]}", flush=True)
            return info
    spec_file.unlink(missing_ok=True)
    return None


def library_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a script that indexes libraries it makes with a model it writes: ``--workdir`` (their
    cache), ``--model`` (:func:`checkpoint_folder`) and ``--json``; described by ``doc``'s first paragraph."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="cache for the checkpoint and the libraries (kept; default: a "
                                                "temporary folder, removed)")
    p.add_argument("--model", default="tiny768", help="tiny, tiny768, tiny-xlmr, full or a checkpoint folder (default: tiny768)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    return p


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers ("10_000,1000000"), each at least `minimum`."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers of at least {minimum}, got {text!r}")
        return values

    return parse


# The instruction sets that decide the CPU figures: fp32 matrix products (AVX2/AVX-512), int8 ones
# (VNNI does in one instruction what takes two without it) and bf16 (AVX512_BF16, AMX).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_name(cpuinfo: str | None = None) -> str:
    """The processor's model name, family and the instruction sets of CPU_FEATURES it has, from
    /proc/cpuinfo (or the `cpuinfo` text given): two VMs that both call themselves "AMD EPYC" can
    be a first-generation Zen without VNNI and a Zen 4 with it, and run the model at very
    different speeds. Where there is no /proc/cpuinfo, what `platform` knows."""
    known = platform.processor() or platform.machine() or "unknown"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return known
    first = cpuinfo.split("\n\n", 1)[0]  # the first processor's block
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))
    name = fields.get("model name") or known
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    if flags:
        details.append(", ".join(f for f in CPU_FEATURES if f in flags) or "no AVX2")
    return f"{name} ({'; '.join(details)})" if details else name


TINY_DIMS = {"tiny": 24, "tiny768": 768, "tiny-xlmr": 768}  # --model choices: the tests' tiny towers, projected
REAL_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xlm-roberta" / "tokenizer.json"


def checkpoint_folder(choice: str, work: Path) -> Path:
    """The checkpoint folder for a ``--model`` option: "tiny" (the tests' tiny random AltCLIP),
    "tiny768" (the same towers projecting to AltCLIP's 768 dimensions: what search and storage cost
    at the real size, with an encoder that costs milliseconds), "tiny-xlmr" (tiny768 with the real
    XLM-R tokenizer of ../shared: what the tokenizer costs a cold query) and "full" (random weights
    with the full BAAI/AltCLIP architecture, bench_model.py's writer) are written once into `work`;
    anything else is a checkpoint folder."""
    if choice in TINY_DIMS:
        from tests.checkpoints import write_checkpoint

        folder = work / f"{choice}-altclip"
        tokenizer = None
        if choice == "tiny-xlmr":
            if not REAL_TOKENIZER.is_file():
                raise SystemExit(f"--model tiny-xlmr needs the XLM-R tokenizer at {REAL_TOKENIZER}")
            tokenizer = REAL_TOKENIZER.read_text(encoding="utf-8")
        if not (folder / "config.json").is_file():
            write_checkpoint(folder, seed=0, projection_dim=TINY_DIMS[choice], tokenizer_json=tokenizer)
        return folder
    if choice == "full":
        from bench_model import write_checkpoint as write_full

        return write_full(work / "full-altclip", tiny=False)
    folder = Path(choice).expanduser()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model: no checkpoint (config.json) in {folder}; use tiny, tiny768, tiny-xlmr, full "
                         "or a folder")
    return folder
