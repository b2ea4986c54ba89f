"""The ``torchkeep`` command: a thin layer over the public API.

Every command prints readable tables, or JSON with ``--json``; an error is one
line on stderr (``--debug``, anywhere on the line, shows the traceback).
Needs the ``cli`` extra (click, rich); ``plot`` also needs matplotlib. torch
is imported only by the commands that read tensors, so ``--help`` is quick.

Exit statuses, the same for every command:

==  ==========================================================================
0   done; everything checked is intact, identical, or safe
1   the answer is no: damage found (verify), differences (diff), unsafe pickles (scan)
2   an error: bad arguments, nothing at the path, unreadable input, refused writes
3   verify read everything but could check structure only (no checksums in the file)
130 interrupted (Ctrl-C)
==  ==========================================================================
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import torchkeep
from torchkeep._version import __version__
from torchkeep.errors import TorchkeepError
from torchkeep.info import TensorInfo, human_size
from torchkeep.retention import KeepBest, KeepLast, best_record, steps_to_delete
from torchkeep.storage import join_key, resolve

__all__ = ["EXIT_CHANGED", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_STRUCTURE_ONLY", "main"]

EXIT_OK = 0
EXIT_CHANGED = 1  # damage, differences, unsafe pickles: the answer is no
EXIT_ERROR = 2
EXIT_STRUCTURE_ONLY = 3  # verified what could be, but the file carries no checksums
EXIT_INTERRUPTED = 130


def _out() -> Console:
    return Console(soft_wrap=True, highlight=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, TensorInfo):
        return {"tensor": value.name, "dtype": value.dtype, "shape": list(value.shape)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _emit(data: Any) -> None:
    click.echo(json.dumps(_jsonable(data), indent=1))


@click.group(
    epilog="Exit status: 0 done and intact; 1 damage, differences or unsafe pickles found; 2 error; "
    "3 verified structure only (no checksums); 130 interrupted."
)
@click.version_option(__version__, prog_name="torchkeep")
@click.option("--debug", is_flag=True, help="Show tracebacks (accepted anywhere on the line).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Look inside, check, compare, convert and manage torchkeep checkpoints."""
    ctx.obj = {"debug": debug}
    if sys.stderr.isatty():  # the bar goes to stderr, so it never mixes with --json output
        ctx.with_resource(_transfers())


@contextlib.contextmanager
def _transfers(after: float = 1.0) -> Iterator[None]:
    """Show the bytes uploaded to and downloaded from object stores, once a command has moved them for ``after`` s."""
    from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from torchkeep.storage.objectstore import observe_transfers

    start = time.monotonic()
    progress = Progress(TextColumn("{task.description}"), DownloadColumn(), TransferSpeedColumn(),
                        console=Console(stderr=True), transient=True)  # fmt: skip
    tasks: dict[str, Any] = {}
    early: dict[str, int] = {"up": 0, "down": 0}
    lock = threading.Lock()

    def moved(direction: str, nbytes: int) -> None:
        with lock:
            if not tasks and time.monotonic() - start < after:
                early[direction] += nbytes  # a short transfer shows no bar at all
                return
            if not tasks:
                progress.start()
            if direction not in tasks:
                label = "uploaded" if direction == "up" else "downloaded"
                tasks[direction] = progress.add_task(label, total=None, completed=early[direction])
            progress.update(tasks[direction], advance=nbytes)

    with observe_transfers(moved):
        try:
            yield
        finally:
            if tasks:
                progress.stop()


def _existing_folder(path: str) -> tuple[Any, str]:
    """The storage and key of a folder that must exist: commands that read never create one."""
    storage, prefix = resolve(path)
    if not storage.exists(prefix) or not storage.is_dir(prefix):
        raise click.ClickException(f"{path!r} is not an existing directory.")
    return storage, prefix


def _checkpoints_in(path: str) -> list[str]:
    """``path`` itself, or each checkpoint of a manager directory or registry folder that ``path`` is."""
    from torchkeep.formats.detect import FILESET_NAME
    from torchkeep.manifest import MANIFEST_NAME

    storage, key = resolve(path)
    if not storage.is_dir(key):
        return [path]
    names = storage.list(key)
    if {MANIFEST_NAME, FILESET_NAME} & set(names):
        return [path]
    steps = [n for n in names if n.startswith("step-") and n[5:].isdigit()]
    if steps:
        return [storage.describe(join_key(key, n)) for n in steps]
    trainer = sorted((n for n in names if n.startswith("checkpoint-") and n[11:].isdigit()), key=lambda n: int(n[11:]))
    if trainer:  # a Hugging Face Trainer's output_dir: sealed or not, each checkpoint-N is verified
        return [storage.describe(join_key(key, n)) for n in trainer]
    if "models" in names:
        found = []
        for model in storage.list(join_key(key, "models")):
            for version in storage.list(join_key(key, "models", model)):
                if version.startswith("v") and version[1:].isdigit():
                    found.append(storage.describe(join_key(key, "models", model, version)))
        return found or [path]
    return [path]


@cli.command()
@click.argument("path")
@click.option("--trust", is_flag=True, help="Unpickle .pth files fully (only files you wrote: runs their code).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(path: str, trust: bool, as_json: bool) -> None:
    """Format, tree, tensors, totals, metadata and provenance, without reading tensor data."""
    info = torchkeep.inspect(path, trust=trust)
    from torchkeep.formats.fileset import FolderInfo

    if isinstance(info, FolderInfo):
        _inspect_folder(info, as_json)
        return
    if as_json:
        _emit({
            "path": info.path, "format": info.format, "format_version": info.format_version,
            "created": info.created, "metadata": info.metadata, "provenance": info.provenance,
            "nbytes": info.nbytes, "tree": info.tree,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes,
                         "device": t.device, "shard": t.shard, "checksum": t.checksum, "shared": t.shared}
                        for t in info.tensors],
        })  # fmt: skip
        return
    out = _out()
    version = f" v{info.format_version}" if info.format_version else ""
    out.print(
        f"[bold]{info.path}[/bold]  {info.format}{version}, {len(info.tensors)} tensors, {human_size(info.nbytes)}"
    )
    for label, value in (("created", info.created), ("provenance", info.provenance), ("metadata", info.metadata)):
        if value:
            out.print(f"{label}: {value}")
    table = Table("name", "dtype", "shape", "size", "device", "")
    for t in info.tensors:
        table.add_row(t.name, t.dtype, str(list(t.shape)), human_size(t.nbytes), t.device, "shared" if t.shared else "")
    out.print(table)


def _inspect_folder(info: Any, as_json: bool) -> None:
    """A sealed folder (``torchkeep-files.json``): the seal, and each file with what the pickle scan found."""
    import dataclasses

    if as_json:
        _emit({
            "path": info.path, "format": info.format, "format_version": info.format_version,
            "engine": info.engine, "created": info.created, "metadata": info.metadata,
            "provenance": info.provenance, "nbytes": info.nbytes, "needs_trust": info.needs_trust,
            "files": [dataclasses.asdict(f) for f in info.files], "tensors": len(info.tensors),
        })  # fmt: skip
        return
    out = _out()
    out.print(
        f"[bold]{info.path}[/bold]  {info.format} v{info.format_version}, {len(info.files)} files, "
        f"{human_size(info.nbytes)}, written by {info.engine}"
    )
    for label, value in (("sealed", info.created), ("metadata", info.metadata)):
        if value:
            out.print(f"{label}: {value}")
    table = Table("file", "size", "pickle", "")
    for f in info.files:
        table.add_row(f.path, human_size(f.size), f.pickle, "; ".join(f.findings))
    out.print(table)
    if info.needs_trust:
        out.print(
            f"[yellow]needs trust[/yellow]: {', '.join(info.needs_trust)} import code off torch's weights_only "
            "allow-list; only the engine that wrote them should unpickle them."
        )


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--trust", is_flag=True, help="Unpickle .pth files fully (only files you wrote: runs their code).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(paths: Sequence[str], trust: bool, as_json: bool) -> None:
    """Re-read every byte and check it against its checksum.

    A manager directory or a registry folder verifies every checkpoint in it.
    Exit status 0 when everything verifies, 1 when anything is damaged, 3 when
    a file carries no checksums (safetensors from elsewhere, legacy torch
    files), so only its structure could be checked.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from torchkeep.formats.fileset import FolderVerifyReport

    targets = [target for path in paths for target in _checkpoints_in(path)]
    sizes = {}
    for target in targets:
        try:
            sizes[target] = torchkeep.inspect(target, trust=trust).nbytes
        except TorchkeepError:
            sizes[target] = 0
    results: list[dict[str, Any]] = []
    out = _out()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(
        *columns, console=Console(stderr=True), transient=True, disable=as_json or not sys.stderr.isatty()
    ) as progress:
        task = progress.add_task("verifying", total=sum(sizes.values()) or None)
        base = 0
        for target in targets:
            progress.update(task, description=f"verifying {os.path.basename(target)}", completed=base)

            def advance(done: int, total: int, start: int = base) -> None:
                progress.update(task, completed=start + done)

            try:
                report = torchkeep.verify(target, trust=trust, progress=advance)
                results.append({"path": target, "ok": True, "tensors": report.tensors, "nbytes": report.nbytes,
                                "method": report.method, "checksums": report.method != "structure"})  # fmt: skip
                if isinstance(report, FolderVerifyReport):  # a sealed folder: files, and those added after the seal
                    results[-1] |= {"files": report.files, "unlisted": list(report.unlisted)}
            except TorchkeepError as err:
                results.append({"path": target, "ok": False, "error": str(err), "error_type": type(err).__name__,
                                "damaged": getattr(err, "damaged", [])})  # fmt: skip
            base += sizes[target]
    if as_json:
        _emit(results)
    else:
        for r in results:
            if r["ok"] and "files" in r:
                size = human_size(r["nbytes"])
                out.print(f"[green]OK[/green]   {r['path']}: {r['files']} files, {size} ({r['method']})")
                if r["unlisted"]:
                    out.print(f"     not in the seal (added later, not checked): {', '.join(r['unlisted'])}")
            elif r["ok"] and r["checksums"]:
                size = human_size(r["nbytes"])
                out.print(f"[green]OK[/green]   {r['path']}: {r['tensors']} tensors, {size} ({r['method']})")
            elif r["ok"]:
                out.print(
                    f"[yellow]STRUCTURE ONLY[/yellow] {r['path']}: {r['tensors']} tensors read and well formed, "
                    "but the file carries no checksums, so damaged values cannot be told from good ones"
                )
            else:
                out.print(f"[red]FAIL[/red] {r['path']}: {r['error']}")
        if len(results) > 1:
            good = sum(r["ok"] for r in results)
            out.print(f"{good} of {len(results)} verified, {len(results) - good} failed")
    if not all(r["ok"] for r in results):
        sys.exit(EXIT_CHANGED)
    if not all(r["checksums"] for r in results):
        sys.exit(EXIT_STRUCTURE_ONLY)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--trust", is_flag=True, help="Unpickle .pth files fully (only files you wrote: runs their code).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff(a: str, b: str, trust: bool, as_json: bool) -> None:
    """Added and removed keys, shape and dtype changes, max absolute and relative differences, metadata.

    Exit status 0 when the tensors and metadata are identical, 1 when they differ (like ``diff``).
    """
    from torchkeep.compare import compare_tensors, flatten_tensors

    tree_a, tree_b = torchkeep.load(a, trust=trust), torchkeep.load(b, trust=trust)
    added, removed, changes = compare_tensors(flatten_tensors(tree_a), flatten_tensors(tree_b))
    meta_a, meta_b = torchkeep.inspect(a, trust=trust).metadata, torchkeep.inspect(b, trust=trust).metadata
    metadata = {
        k: [meta_a.get(k), meta_b.get(k)] for k in sorted(set(meta_a) | set(meta_b)) if meta_a.get(k) != meta_b.get(k)
    }
    differs = bool(added or removed or metadata) or any(
        c.max_abs != 0 or c.dtype_a != c.dtype_b or c.shape_a != c.shape_b for c in changes
    )
    if as_json:
        _emit({"added": added, "removed": removed, "metadata": metadata, "identical": not differs,
               "changes": [c.__dict__ for c in changes]})  # fmt: skip
        sys.exit(EXIT_CHANGED if differs else EXIT_OK)
    out = _out()
    for key in added:
        out.print(f"[green]+ {key}[/green]")
    for key in removed:
        out.print(f"[red]- {key}[/red]")
    table = Table("key", "shape", "dtype", "max |a-b|", "max rel")
    same = 0
    for c in changes:
        if c.max_abs == 0 and c.dtype_a == c.dtype_b:
            same += 1
            continue
        shape = str(list(c.shape_a)) if c.shape_a == c.shape_b else f"{list(c.shape_a)} -> {list(c.shape_b)}"
        dtype = c.dtype_a if c.dtype_a == c.dtype_b else f"{c.dtype_a} -> {c.dtype_b}"
        table.add_row(c.key, shape, dtype, "-" if c.max_abs is None else f"{c.max_abs:.3g}",
                      "-" if c.max_rel is None else f"{c.max_rel:.3g}")  # fmt: skip
    if table.row_count:
        out.print(table)
    out.print(f"{same} tensor(s) identical")
    for key, (va, vb) in metadata.items():
        out.print(f"metadata {key}: {va!r} -> {vb!r}")
    if differs:
        sys.exit(EXIT_CHANGED)


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}  # fmt: skip


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default=None, help="Cast floating-point tensors.")
@click.option("--trust", is_flag=True, help="Unpickle .pth files fully (only files you wrote: runs their code).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def convert(src: str, dst: str, dtype: str | None, trust: bool, as_json: bool) -> None:
    """Convert between native, .safetensors and .pth (sharded safetensors are read); the format follows DST.

    The metadata travels with the tensors, except into a .pth, which has no place for it (said in the output).
    """
    import torch

    from torchkeep.formats.detect import Format

    start = time.perf_counter()
    metadata = torchkeep.inspect(src, trust=trust).metadata
    keeps_metadata = Format.for_path(dst) != Format.TORCH_ZIP
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(
        *columns, console=Console(stderr=True), transient=True, disable=as_json or not sys.stderr.isatty()
    ) as progress:
        task = progress.add_task(f"writing {os.path.basename(dst)}", total=None)
        tree = torchkeep.load(src, dtype=getattr(torch, _DTYPES[dtype]) if dtype else None, trust=trust)
        torchkeep.save(
            tree,
            dst,
            metadata=metadata if keeps_metadata else None,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    info = torchkeep.inspect(dst)
    dropped = sorted(metadata) if metadata and not keeps_metadata else []
    result = {"src": src, "dst": dst, "format": info.format, "tensors": len(info.tensors), "nbytes": info.nbytes,
              "seconds": time.perf_counter() - start, "metadata_dropped": dropped}  # fmt: skip
    if as_json:
        _emit(result)
    else:
        _out().print(f"{src} -> {dst} ({info.format}): {len(info.tensors)} tensors, {human_size(info.nbytes)}")
        if dropped:
            _out().print(f"[yellow]metadata not kept[/yellow] (a .pth has no place for it): {', '.join(dropped)}")


def _policies(keep_last: int | None, keep_best: int | None, monitor: str | None, mode: str) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    if keep_last:
        policies[f"last {keep_last}"] = KeepLast(keep_last)
    if keep_best:
        if not monitor:
            raise click.UsageError("--keep-best needs --monitor")
        policies[f"best {keep_best}"] = KeepBest(keep_best, monitor, mode)  # type: ignore[arg-type]
    return policies


def _leftovers(storage: Any, prefix: str) -> list[dict[str, Any]]:
    """Hidden staging left in a run directory and its object folder (local disks only)."""
    found = []
    for folder in (prefix, join_key(prefix, "objects")):
        for name, size in getattr(storage, "leftovers", lambda _: [])(folder):
            found.append({"name": join_key(folder, name)[len(prefix) :].lstrip("/"), "size": size})
    return found


def _clean(storage: Any, prefix: str) -> list[str]:
    removed = []
    for folder in (prefix, join_key(prefix, "objects")):
        for name in getattr(storage, "clean", lambda _: [])(folder):
            removed.append(join_key(folder, name)[len(prefix) :].lstrip("/"))
    return removed


def _retention_options(f: Any) -> Any:
    for option in reversed([
        click.option("--keep-last", type=int, default=None, help="Keep the newest N."),
        click.option("--keep-best", type=int, default=None, help="Keep the best K by --monitor."),
        click.option("--monitor", default=None, help="The metric that ranks checkpoints."),
        click.option("--mode", type=click.Choice(["min", "max"]), default="min"),
    ]):  # fmt: skip
        f = option(f)
    return f


@cli.command(name="ls")
@click.argument("directory")
@_retention_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(directory: str, keep_last: int | None, keep_best: int | None, monitor: str | None, mode: str,
       as_json: bool) -> None:  # fmt: skip
    """A manager directory's checkpoints: step, time, size, metrics, best, what keeps each, damage.

    Also lists what interrupted saves left behind (hidden staging folders); ``prune`` removes them.
    """
    from torchkeep.formats import open_checkpoint
    from torchkeep.run_directory import read_records

    storage, prefix = _existing_folder(directory)
    records = read_records(storage, prefix, warn=False)
    policies = _policies(keep_last, keep_best, monitor, mode)
    kept_by = {name: policy.keep(records) for name, policy in policies.items()}
    best = best_record(records, monitor, mode) if monitor else None
    by_step = {r.step: r for r in records}
    rows: list[dict[str, Any]] = []
    for name in storage.list(prefix):
        if not name.startswith("step-") or not name[5:].isdigit():
            continue
        step = int(name[5:])
        key = f"{prefix}/{name}" if prefix else name
        try:
            open_checkpoint(storage, key)
            state = "ok"
        except torchkeep.CheckpointNotFoundError:
            state = "incomplete"
        except TorchkeepError as err:
            state = f"damaged: {err}"
        r = by_step.get(step)
        row: dict[str, Any] = {
            "step": step, "state": state, "path": storage.describe(key),
            "created": r.created if r else None, "size": r.size if r else None,
            "metrics": r.metrics if r else {}, "best": best is not None and best.step == step,
            "kept_by": [label for label, steps in kept_by.items() if step in steps],
        }  # fmt: skip
        rows.append(row)
    rows.sort(key=lambda row: row["step"])
    leftovers = _leftovers(storage, prefix)
    if as_json:
        _emit({"checkpoints": rows, "leftovers": leftovers})
        return
    metric_names = sorted({m for row in rows for m in row["metrics"]})
    table = Table("step", "written", "size", *metric_names, "kept by" if policies else "", "")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"])) if row["created"] else "-"
        values = [f"{row['metrics'][m]:.4g}" if m in row["metrics"] else "-" for m in metric_names]
        flag = "[bold]best[/bold]" if row["best"] else ""
        if row["state"] != "ok":
            flag = f"[red]{row['state']}[/red]"
        table.add_row(str(row["step"]), when, human_size(row["size"]) if row["size"] else "-", *values,
                      ", ".join(row["kept_by"]), flag)  # fmt: skip
    _out().print(table)
    for item in leftovers:
        _out().print(f"[yellow]left by an interrupted save[/yellow]: {item['name']} ({human_size(item['size'])})")


@cli.command()
@click.argument("directory")
@_retention_options
@click.option("--dry-run", is_flag=True, help="Show what would be deleted, delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(directory: str, keep_last: int | None, keep_best: int | None, monitor: str | None, mode: str,
          dry_run: bool, as_json: bool) -> None:  # fmt: skip
    """Apply a retention policy after the fact (the newest and the best are always kept).

    Also removes what interrupted saves left behind, never a live writer's staging.
    """
    storage, prefix = _existing_folder(directory)
    policies = _policies(keep_last, keep_best, monitor, mode)
    with torchkeep.CheckpointManager(directory, monitor=monitor, mode=mode) as mgr:  # type: ignore[arg-type]
        records = mgr.list()
        policy = torchkeep.AnyOf(*policies.values()) if policies else None
        doomed = steps_to_delete(records, policy, monitor=monitor, mode=mode)
        leftovers = _leftovers(storage, prefix)
        cleaned: list[str] = []
        if not dry_run:
            for step in doomed:
                mgr.delete(step)
            cleaned = _clean(storage, prefix)
    result = {
        "deleted" if not dry_run else "would_delete": doomed,
        "kept": [r.step for r in records if r.step not in doomed],
        "leftovers_removed" if not dry_run else "leftovers": cleaned if not dry_run else leftovers,
    }
    if as_json:
        _emit(result)
    else:
        verb = "would delete" if dry_run else "deleted"
        _out().print(f"{verb}: {doomed or 'nothing'}; kept: {result['kept']}")
        if dry_run and leftovers:
            _out().print(f"left by interrupted saves: {', '.join(i['name'] for i in leftovers)}")
        elif cleaned:
            _out().print(f"removed what interrupted saves left: {', '.join(cleaned)}")


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def scan(paths: Sequence[str], as_json: bool) -> None:
    """Statically list what pickle-based files would import; exit 1 when anything unsafe is found.

    Files that hold no pickle (safetensors, native checkpoints) are reported as such: they cannot run code.
    """
    plain = [path for path in paths if _holds_no_pickle(path)]
    results = [_scan(path) for path in paths if path not in plain]
    if as_json:
        _emit([{"path": path, "ok": True, "pickles": 0, "errors": [], "findings": [], "pickle_free": True}
               for path in plain]
              + [{"path": r.path, "ok": r.ok, "pickles": r.pickles, "errors": r.errors, "pickle_free": False,
                  "findings": [{"module": f.module, "name": f.name, "dangerous": f.dangerous, "reason": f.describe()}
                               for f in r.findings]}
                 for r in results])  # fmt: skip
    else:
        out = _out()
        for path in plain:
            out.print(f"[green]clean[/green] {path}: no pickle (safetensors or a torchkeep checkpoint), no code to run")
        for r in results:
            if r.ok:
                out.print(f"[green]clean[/green] {r.path}: {r.pickles} pickle(s), {len(r.globals)} safe global(s)")
            for f in r.findings:
                out.print(f"[red]{'DANGEROUS' if f.dangerous else 'unsafe'}[/red] {r.path}: {f.describe()}")
            for e in r.errors:
                out.print(f"[red]error[/red] {e}")
    if not all(r.ok for r in results):
        sys.exit(EXIT_CHANGED)


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _scan(path: str) -> Any:
    """Scan a local file, or the bytes of an object in a store (the report names the URL)."""
    from torchkeep.scan import scan_bytes, scan_file

    if not _is_url(path):
        return scan_file(path)
    storage, key = resolve(path)
    return scan_bytes(storage.read(key), path)


def _holds_no_pickle(path: str) -> bool:
    """A native checkpoint directory or a safetensors file: formats that hold no pickle at all."""
    if _is_url(path):
        try:
            storage, key = resolve(path)
            if storage.is_dir(key):
                return storage.exists(join_key(key, "manifest.json"))
            head = storage.read(key, 0, 9)
        except TorchkeepError:
            return False
    elif os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "manifest.json"))
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(9)
        except OSError:
            return False
    from torchkeep.formats.detect import is_safetensors_head

    return is_safetensors_head(head)


@cli.command()
@click.argument("directory")
@click.option("--out", "out_path", default=None, help="PNG to write (default: DIRECTORY/metrics.png).")
@click.option("--monitor", default=None, help="The metric whose best checkpoint is marked.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plot(directory: str, out_path: str | None, monitor: str | None, mode: str, as_json: bool) -> None:
    """A PNG of the metrics across checkpoints, the best one marked (needs matplotlib)."""
    from torchkeep.run_directory import read_records

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("plot needs matplotlib: pip install 'torchkeep[plot]'") from None
    storage, prefix = _existing_folder(directory)
    records = read_records(storage, prefix, warn=False)
    names = sorted({m for r in records for m in r.metrics})
    if not names:
        raise click.ClickException(f"{directory} has no checkpoints with metrics to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        points = [(r.step, r.metrics[name]) for r in records if name in r.metrics]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    best = best_record(records, monitor, mode) if monitor else None
    if best is not None and monitor is not None:
        ax.scatter(
            [best.step], [best.metrics[monitor]], s=200, marker="*", color="gold", zorder=5, label=f"best {monitor}"
        )
    ax.set_xlabel("step")
    ax.set_title(f"checkpoints in {directory}")
    ax.legend()
    if out_path is None and _is_url(directory):
        raise click.UsageError(f"{directory} is not on this machine's disk: give a local file with --out")
    target = out_path or os.path.join(directory, "metrics.png")
    # Written beside the target under a new name (never through a link or a planted file), then
    # renamed over it: a link at the target is replaced itself, its target never written.
    import contextlib
    import errno
    import secrets
    import stat

    from torchkeep.errors import StorageError

    folder, base = os.path.split(os.path.abspath(target))
    temp = os.path.join(folder, f".{base}.tk-plot-{os.getpid()}-{secrets.token_hex(4)}")
    suffix = os.path.splitext(base)[1][1:].lower()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        if os.path.isdir(target) and not os.path.islink(target):
            raise IsADirectoryError(errno.EISDIR, "it is a directory; give a file name with --out", target)
        fd = os.open(temp, flags, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file", temp)
                fig.savefig(f, format=suffix or None, dpi=100, bbox_inches="tight")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
    except OSError as exc:
        raise StorageError(
            f"Could not write the plot to {target!r}: {exc.strerror or exc}. Choose a writable file with --out.",
            path=target,
        ) from exc
    finally:
        plt.close(fig)
    if as_json:
        _emit({"path": target, "metrics": names, "checkpoints": len(records)})
    else:
        _out().print(f"wrote {target}")


@cli.group()
def models() -> None:
    """The model registry: list, show, alias, search."""


@models.command(name="ls")
@click.argument("root")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_ls(root: str, name: str | None, as_json: bool) -> None:
    """Models (or one model's versions)."""
    registry = _registry(root)
    if name is None:
        rows = [{"name": m, "versions": len(vs := registry.versions(m)),
                 "latest": vs[-1].version, "aliases": {a: v.version for v in vs for a in v.aliases}}
                for m in registry.models()]  # fmt: skip
    else:
        rows = [_version_row(v) for v in registry.versions(name)]
    if as_json:
        _emit(rows)
        return
    if not rows:
        _out().print("no models" if name is None else f"{name}: no versions")
        return
    table = Table(*rows[0].keys())
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    _out().print(table)


def _registry(root: str) -> torchkeep.Registry:
    """An existing registry: a command never makes one where it was pointed by mistake."""
    storage, prefix = _existing_folder(root)
    names = storage.list(prefix)
    if "models" not in names and "index.sqlite" not in names:
        raise click.ClickException(
            f"{root!r} is not a model registry (it has no models folder); torchkeep.Registry(path).register() "
            "makes one."
        )
    return torchkeep.Registry(root)


def _version_row(v: torchkeep.ModelVersion) -> dict[str, Any]:
    return {
        "name": v.name, "version": v.version, "created": v.created, "aliases": list(v.aliases),
        "tags": list(v.tags), "metadata": v.metadata, "description": v.description, "lineage": v.lineage,
    }  # fmt: skip


@models.command(name="show")
@click.argument("root")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_show(root: str, name: str, version: str | None, as_json: bool) -> None:
    """One version (a number, an alias, or the latest)."""
    v = _registry(root).get(name, int(version) if version and version.isdigit() else version)
    row = _version_row(v)
    if as_json:
        _emit(row)
    else:
        for key, value in row.items():
            _out().print(f"{key}: {value}")


@models.command(name="alias")
@click.argument("root")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_alias(root: str, name: str, alias: str, version: int, as_json: bool) -> None:
    """Point ALIAS at VERSION."""
    _registry(root).set_alias(name, alias, version)
    if as_json:
        _emit({"name": name, "alias": alias, "version": version})
    else:
        _out().print(f"{name}:{alias} -> v{version}")


_OPS = (">=", "<=", "!=", "==", ">", "<", "=")


def _condition(text: str) -> tuple[str, tuple[str, Any]]:
    for op in _OPS:
        if op in text:
            field, _, raw = text.partition(op)
            try:
                value: Any = json.loads(raw)
            except ValueError:
                value = raw
            return field.strip(), (op, value)
    raise click.BadParameter(f"{text!r}: write FIELD OP VALUE, OP one of {' '.join(_OPS)}")


@models.command(name="search")
@click.argument("root")
@click.argument("name", required=False)
@click.option("--where", "conditions", multiple=True, help="FIELD OP VALUE, e.g. 'accuracy>=0.9'.")
@click.option("--order-by", default=None)
@click.option("--ascending", is_flag=True)
@click.option("--limit", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_search(root: str, name: str | None, conditions: Sequence[str], order_by: str | None, ascending: bool,
                  limit: int | None, as_json: bool) -> None:  # fmt: skip
    """Versions whose metadata match, ordered by a metadata field."""
    where = dict(_condition(c) for c in conditions)
    found = _registry(root).search(name, where=where, order_by=order_by, descending=not ascending, limit=limit)
    rows = [_version_row(v) for v in found]
    if as_json:
        _emit(rows)
        return
    table = Table("name", "version", "aliases", "metadata")
    for row in rows:
        table.add_row(row["name"], str(row["version"]), ", ".join(row["aliases"]), json.dumps(row["metadata"]))
    _out().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status instead of raising (errors are one line on stderr)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:  # accepted anywhere on the line, as the group's own option
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        cli.main(args=args, prog_name="torchkeep", standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_ERROR
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"error: {exc.format_message()}", err=True)
        return EXIT_ERROR
    except (TorchkeepError, OSError, ValueError) as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return EXIT_ERROR
    return EXIT_OK
