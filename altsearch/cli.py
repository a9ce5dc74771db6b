"""The ``altsearch`` command: a thin typer + rich layer over :class:`altsearch.Engine`."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import threading
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from .errors import AltsearchError

# torch and faiss each bring an OpenMP runtime; with the default busy-waiting policy their idle threads
# spin against each other, and a warm query takes 10-40x longer on a small machine. Must be set before
# either is imported (both are imported lazily, below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(name="altsearch", no_args_is_help=True, add_completion=False,
                  help="Bilingual (Chinese / English) image search with AltCLIP.",
                  context_settings={"help_option_names": ["-h", "--help"]})
model_app = typer.Typer(no_args_is_help=True, help="Inspect and convert AltCLIP checkpoints.")
app.add_typer(model_app, name="model")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _printable(text: str) -> str:
    """File names that are not valid UTF-8 reach Python as lone surrogates, which a UTF-8 terminal
    cannot show: print those bytes as U+FFFD instead of failing."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _print_json(obj) -> None:
    """JSON on stdout. A lone surrogate (a non-UTF-8 file name) is written as its ``\\udcXX`` escape,
    which is valid JSON and decodes back to the same Python string, so ``os.fsencode`` gives the
    file's real name."""
    text = json.dumps(obj, ensure_ascii=False, indent=2)
    out.print(text.encode("utf-8", "backslashreplace").decode("utf-8"), markup=False, highlight=False)


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit code 1: how the CLI answers bad input."""
    err.print(f"[red]error:[/red] {escape(_printable(message))}")
    raise typer.Exit(1)


def _warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(_printable(message))}")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# the device strings that both the model (torch) and the vector index (vectors.gpu_for) accept
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")


def _device(value: str) -> str:
    """--device, checked while the command line is parsed: before a thread opens the vector index
    with it, or the model loads on it. A GPU number beyond those torch sees is refused here too
    (torch is imported for it only then), as moving the model there fails with a traceback."""
    if not _DEVICE.fullmatch(value):
        _fail(f"unknown device {value!r} (use auto, cpu, cuda, cuda:N or mps)")
    if value.startswith("cuda:") and value != "cuda:0":
        import torch

        if torch.cuda.is_available() and int(value[5:]) >= torch.cuda.device_count():
            _fail(f"device {value!r} asked for, but torch sees {_plural(torch.cuda.device_count(), 'CUDA GPU')}")
    return value


def _given(paths):
    """A path argument (or several), refused when empty: the shell passes "" for an unset variable,
    which as a path would mean the current folder."""
    if any(not p for p in ([paths] if isinstance(paths, str) else paths)):
        _fail("an empty path was given (an unset shell variable?); name a file or folder")
    return paths


IndexOpt = Annotated[Optional[str], typer.Option(
    "--index", "-i", envvar="ALTSEARCH_INDEX", show_default="default",
    help="Index name (under $ALTSEARCH_HOME/indexes) or folder.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default="the index's model, else BAAI/AltCLIP", help="Hub id or model folder.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", callback=_device)]
DtypeOpt = Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    help="int8: quantise the model's Linear layers (CPU, fp32 only; vectors close to, not equal to, fp32).")]


class DecodeChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
KOpt = Annotated[int, typer.Option("-k", "--top", min=1, help="Number of results.")]
def _folder(value: str | None) -> Path | None:
    """--under, refused when empty (as a path, "" would mean the current folder)."""
    return None if value is None else Path(_given(value))


UnderOpt = Annotated[Optional[str], typer.Option("--under", help="Only images under this folder.", callback=_folder,
                                                 metavar="<path>")]
FromOpt = Annotated[Optional[str], typer.Option(
    "--from", help="Taken on or after this date (YYYY, YYYY-MM, YYYY-MM-DD); file time when no EXIF date.")]
ToOpt = Annotated[Optional[str], typer.Option("--to", help="Taken on or before this date.")]
MinScoreOpt = Annotated[Optional[float], typer.Option("--min-score", help="Drop results scoring below this.")]


@contextmanager
def _errors():
    """Library errors become one line on stderr and exit code 1."""
    try:
        yield
    except AltsearchError as e:
        _fail(str(e))


def _engine(index, model=None, device="auto", dtype="auto", create=False, quantize=None):
    from .engine import Engine

    return Engine.open(index, model=model, device=device, dtype=dtype, quantize=quantize, create=create)


@contextmanager
def _vectors_opened_meanwhile(engine):
    """Open the index's vector index in a background thread while this one loads the model.

    A flat index is built from the catalogue's vectors (read in a few large steps, so the thread
    seldom needs the GIL); an approximate one's file is checksummed and read, mostly outside the GIL.
    A cold query therefore waits for the slower of the two instead of their sum. The search takes the
    opened index (or waits for it); an error is left for the search to raise, as it then opens the
    index itself. The thread is done before the engine closes.
    """
    def open_vectors() -> None:
        try:
            engine.store.vectors
        except AltsearchError:
            pass

    thread = threading.Thread(target=open_vectors, name="altsearch-open-vectors", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _table(**kwargs):
    from rich.table import Table

    return Table(show_edge=False, pad_edge=False, **kwargs)


# -- index ---------------------------------------------------------------------------------------


@app.command()
def index(
    folder: Annotated[str, typer.Argument(help="Folder (or single image) to index.", callback=_given)],
    index: IndexOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per model batch.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=0, show_default="cores - 1 with the model on CUDA; on the CPU 1, or 0 on 2 cores or fewer",
        help="Decode processes (0 = decode in this process); reader threads (by default at most 8) when "
             "JPEGs decode on the GPU.")] = None,
    full_decode: Annotated[bool, typer.Option(
        "--full-decode", help="Decode JPEGs at full size (slower; no reduced-size decoding).")] = False,
    decode: Annotated[DecodeChoice, typer.Option(
        help="Where JPEGs are decoded: auto = on the GPU (nvImageCodec or torchvision) when the model "
             "runs on CUDA, either is installed and 2,000 files or more need embedding.")] = DecodeChoice.auto,
    hidden: Annotated[bool, typer.Option("--hidden", help="Also index hidden files and folders.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    as_json: JsonOpt = False,
):
    """Embed every image under FOLDER into the index (incremental: re-runs only do what changed)."""
    from .ingest import IndexReport

    show_bar = not quiet and not as_json and err.is_terminal
    with _errors(), _engine(index, model, device, dtype, create=True, quantize=quantize) as engine:
        try:
            with _progress(show_bar) as progress:
                report: IndexReport = engine.index(folder, progress=progress, batch_size=batch_size,
                                                   workers=workers, draft=not full_decode,
                                                   decode=decode.value, include_hidden=hidden)
        except KeyboardInterrupt:  # a second Ctrl-C, or one during the final commit
            err.print("interrupted: what was committed is kept; run the same command again to finish")
            raise typer.Exit(130) from None
        if as_json:
            _print_json(report.to_dict())
        elif not quiet:
            _print_report(report)
        if report.interrupted:
            raise typer.Exit(130)


# what a rebuild of the vector index is doing (vectors.BuildProgress steps), and the unit it counts
_BUILD_STEPS = {"load": ("reading vectors", "vectors"), "train": ("training the vector index", ""),
                "add": ("adding vectors", "vectors"), "tune": ("tuning the vector index", "")}


def _build_step(bar, step: str, done: int, total: int | None) -> None:
    description, unit = _BUILD_STEPS[step]
    if step == "train" and done == 0:
        total = None  # one opaque k-means run (25 s at 1M): a pulsing bar, not an empty one with no ETA
    bar(description, done, total, unit)


@contextmanager
def _bar(enabled: bool):
    """A transient progress bar on stderr: yields update(description, done, total, unit), or None
    when disabled. A new description starts the count (rate, ETA) afresh."""
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            unit = task.fields.get("unit")
            if not unit:
                return Text("")
            return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s")

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                   console=err, transient=True)
    task = bar.add_task("", total=None, unit="", note="")

    def update(description: str, done: int, total: int | None, unit: str, note: str = "") -> None:
        if bar.tasks[0].description != description:
            bar.reset(task, description=description, total=total, unit=unit, note=note)
        bar.update(task, completed=done, total=total, note=note)

    with bar:
        yield update


@contextmanager
def _progress(enabled: bool):
    """An indexing run's progress callback (ingest.Progress) drawing a bar, or None."""
    names = {"scan": "scanning", "embed": "embedding", "done": "done"}
    with _bar(enabled) as bar:
        if bar is None:
            yield None
            return

        def update(p) -> None:
            if p.phase == "vectors":
                _build_step(bar, p.step, p.done, p.total)
            elif p.phase == "embed" and p.total is None:  # the scan goes on: no total, no ETA yet
                bar(names[p.phase], p.done, None, "img", f"still scanning: {p.found:,} found to embed")
            else:
                bar(names[p.phase], p.done, p.total, "img")

        yield update


@contextmanager
def _build_progress(enabled: bool):
    """A vector index rebuild's progress callback (vectors.BuildProgress) drawing a bar, or None."""
    with _bar(enabled) as bar:
        yield None if bar is None else functools.partial(_build_step, bar)


def _print_report(r) -> None:
    verb = "Interrupted" if r.interrupted else "Indexed"
    where = f", JPEGs decoded on the GPU by {r.jpeg_library}" if r.decoder == "gpu" else ""
    out.print(f"{verb} {escape(_printable(r.folder))} in {r.seconds:.1f}s "
              f"({r.embedded} embedded, {r.images_per_second:.1f} images/s{where})")
    out.print(f"  added {r.added}, updated {r.updated}, moved {r.moved}, removed {r.removed}, "
              f"unchanged {r.unchanged}, failed {r.failed}"
              + (f" ({_plural(r.duplicates, 'duplicate')} reused a stored vector)" if r.duplicates else ""))
    if r.dropped:
        were = "1 of them was" if r.dropped == 1 else f"{r.dropped} of them were"
        out.print(f"  {were} indexed before, changed since and can no longer be read: dropped from the index")
    if r.failed:
        out.print("  see the failures with: altsearch errors")


# -- search / similar ----------------------------------------------------------------------------


# click's UsageError as typer raises it: typer's own copy of click from 0.2x, click's before; no public name
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _QueryCommand(TyperCommand):
    """A command taking a query: one that starts with an operator ("-dog + cat") reads as options to
    the parser, and the error it gets then says to put the query after --."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        given = list(args)  # the parser consumes args
        try:
            return super().parse_args(ctx, args)
        except _USAGE_ERROR as e:  # "No such option: -d", ...
            options = {name for p in self.params for name in p.opts}
            before = given[:given.index("--")] if "--" in given else given
            query = next((a for a in before if a[:1] == "-" and a[:2] != "--" and a not in options), None)
            if query is not None:
                e.message += (f"\nA query that starts with - goes after -- (and the options before it): "
                              f"altsearch search -- {shlex.quote(query)}")
            raise


@app.command(cls=_QueryCommand)
def search(
    query: Annotated[str, typer.Argument(help='Text, image paths and #ids, combined with + and -, '
                                               'e.g. "海边的日落", "beach + sunset - people". One that '
                                               'starts with - goes after --: altsearch search -- "-dog + cat".')],
    index: IndexOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None, k: KOpt = 10, under: UnderOpt = None, date_from: FromOpt = None,
    date_to: ToOpt = None, min_score: MinScoreOpt = None, as_json: JsonOpt = False,
):
    """Find images matching a text (any language), an image, or a combination."""
    from .query import parse_query

    with _errors():
        parsed = parse_query(query)  # a mistyped query fails before anything is read
    with _errors(), _engine(index, model, device, dtype, quantize=quantize) as engine, \
            _vectors_opened_meanwhile(engine):
        hits = engine.search(parsed, k=k, under=under, taken_from=date_from, taken_to=date_to,
                             min_score=min_score)
        _print_hits(hits, as_json, under)


@app.command()
def similar(
    image: Annotated[str, typer.Argument(help="An image file (indexed or not), or #ID of an indexed image.")],
    index: IndexOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None, k: KOpt = 10, under: UnderOpt = None, date_from: FromOpt = None,
    date_to: ToOpt = None, min_score: MinScoreOpt = None, as_json: JsonOpt = False,
):
    """Find images that look like IMAGE."""
    with _errors(), _engine(index, model, device, dtype, quantize=quantize) as engine, \
            _vectors_opened_meanwhile(engine):
        hits = engine.similar(image, k=k, under=under, taken_from=date_from, taken_to=date_to,
                              min_score=min_score)
        _print_hits(hits, as_json, under)


def _print_hits(hits, as_json: bool, under: Path | None = None) -> None:
    if not hits and under is not None and not under.expanduser().exists():
        _warn(f"--under {under}: no such folder")
    if as_json:
        _print_json([h.to_dict() for h in hits])
        return
    if not hits:
        out.print("no results")
        return
    table = _table()
    # the catalogue id, as #ID names an image in queries (similar "#12", search "#12 + snow"); the
    # rank is not written #, which would read as one
    for col, justify in (("rank", "right"), ("id", "right"), ("score", "right"), ("date", "left"),
                         ("size", "right"), ("path", "left")):
        table.add_column(col, justify=justify, overflow="fold" if col == "path" else "ellipsis")
    for rank, h in enumerate(hits, 1):
        link = Path(h.path).as_uri() if Path(h.path).is_absolute() else h.path
        table.add_row(str(rank), f"#{h.id}", f"{h.score:.3f}", h.date.strftime("%Y-%m-%d"), _human(h.size),
                      f"[link={escape(link)}]{escape(_printable(h.path))}[/link]")
    out.print(table)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- maintenance ---------------------------------------------------------------------------------


@app.command()
def info(index: IndexOpt = None, as_json: JsonOpt = False):
    """Show what an index holds: images, vectors, failures, model, dimension."""
    with _errors(), _engine(index) as engine:
        stats = engine.stats()
        if as_json:
            _print_json(stats)
            return
        table = _table(show_header=False)
        for key, value in stats.items():
            table.add_row(key, escape(str(value)))
        out.print(table)


@app.command()
def errors(index: IndexOpt = None, as_json: JsonOpt = False):
    """List the files that could not be indexed, with the reason."""
    with _errors(), _engine(index) as engine:
        failures = engine.failures()
        if as_json:
            _print_json(failures)
            return
        if not failures:
            out.print("no failures")
            return
        table = _table()
        table.add_column("path", overflow="fold")
        table.add_column("reason")
        for f in failures:
            table.add_row(escape(_printable(f["path"])), escape(_printable(f["reason"])))
        out.print(table)


@app.command()
def remove(
    paths: Annotated[list[str], typer.Argument(help="Files or folders to drop from the index.", callback=_given)],
    index: IndexOpt = None, as_json: JsonOpt = False,
):
    """Drop files (or whole folders) from the index. The files themselves are not touched."""
    with _errors(), _engine(index) as engine:
        # a path that is neither on disk nor in the index is likely mistyped (one that is only in the
        # index names the deleted files whose records, or recorded failures, this drops)
        unknown = [p for p in paths if not os.path.lexists(os.path.expanduser(p))
                   and not engine.store.catalog.holds(os.path.abspath(os.path.expanduser(p)))]
        with _build_progress(not as_json and err.is_terminal) as progress:
            n = engine.remove(paths, progress=progress)
        for p in unknown:
            _warn(f"{p}: no such file or folder, on disk or in the index")
        _print_json({"removed": n}) if as_json else out.print(f"removed {_plural(n, 'image')}")


@app.command()
def optimize(
    index: IndexOpt = None,
    kind: Annotated[str, typer.Option(help="auto (by size), flat (exact), ivfpq (compact, re-ranked) or ivf "
                                           "(approximate). Any but auto is kept by later runs until --kind auto.")] = "auto",
    as_json: JsonOpt = False,
):
    """Rebuild the vector index from stored vectors (exact while small, approximate when large, or the kind chosen)."""
    with _errors(), _engine(index) as engine:
        with _build_progress(not as_json and err.is_terminal) as progress:
            result = engine.optimize(kind, progress=progress)
        if as_json:
            _print_json(result)
        else:
            out.print(f"vector index: {result['kind']}, {_plural(result['vectors'], 'vector')}")


@app.command()
def check(
    index: IndexOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild the vector index (and its file, if its kind has one) from stored vectors.")] = False,
    as_json: JsonOpt = False,
):
    """Verify that catalogue and vector index agree (exit code 1 when they do not and --repair is off)."""
    with _errors(), _engine(index) as engine:
        with _build_progress(repair and not as_json and err.is_terminal) as progress:
            problems = engine.check(repair=repair, progress=progress)
        ok = not problems or repair
        if as_json:
            _print_json({"problems": problems, "repaired": bool(problems and repair)})
        elif not problems:
            out.print("index is consistent")
        else:
            for p in problems:
                out.print(f"problem: {escape(_printable(p))}")
            out.print("repaired: vector index rebuilt from the catalogue" if repair
                      else "run `altsearch check --repair` to rebuild the vector index")
        if not ok:
            raise typer.Exit(1)


# -- model ---------------------------------------------------------------------------------------


@model_app.command("info")
def model_info(source: Annotated[str, typer.Argument(help="Hub id or model folder.")] = "BAAI/AltCLIP",
               as_json: JsonOpt = False):
    """Architecture, parameter counts and files of a checkpoint (no weights are read)."""
    from .model import load_model

    with _errors():
        info = load_model(source, device="cpu", dtype="fp32").info()
        if as_json:
            _print_json(info)
            return
        p = info["parameters"]
        out.print(f"[bold]{escape(info['source'])}[/bold]  ({escape(info['path'])})")
        t, v = info["text"], info["vision"]
        out.print(f"  text:   XLM-R, {t['layers']} layers, width {t['width']}, {t['heads']} heads, "
                  f"vocab {t['vocab']}, max {t['max_tokens']} tokens, {p['text']:,} parameters")
        out.print(f"  vision: ViT, {v['layers']} layers, width {v['width']}, {v['heads']} heads, "
                  f"patch {v['patch']}, {v['image_size']} px, {p['vision']:,} parameters")
        out.print(f"  joint space: {info['dimension']} dimensions; total {p['total']:,} parameters")
        out.print(f"  files: {', '.join(info['files'])}")


@model_app.command("convert")
def model_convert(src: Annotated[Path, typer.Argument(help="Checkpoint folder (pytorch_model.bin and/or "
                                                             "sentencepiece.bpe.model).")],
                  dst: Annotated[Path, typer.Argument(help="New folder for the safetensors copy.")]):
    """Convert pytorch_model.bin to model.safetensors and sentencepiece.bpe.model to tokenizer.json."""
    from .model.weights import convert_checkpoint

    with _errors():
        written = convert_checkpoint(src, dst)
        out.print(f"wrote {escape(str(dst))}: {', '.join(written)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
