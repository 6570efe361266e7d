"""The ``dcp-safetensors`` command line.

Example:
    $ dcp-safetensors demo                      # a 2-rank FSDP2 save + resharding load
    $ dcp-safetensors inspect PATH [--json]     # files, tensors, snapshot, training state
    $ dcp-safetensors verify PATH               # every check and checksum; exit 0 only if intact
    $ dcp-safetensors convert SRC DST --max-shard-size 5GB --dtype bf16

``PATH``, ``SRC`` and ``DST`` are local directories or ``s3://`` URLs
(``--storage-option key=value``, repeated, for the fsspec filesystem). Exit
codes: 0 success, 1 a failed check or an error (message on stderr), 2 bad
usage, 130 interrupted. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dcp_safetensors.errors import ConfigurationError, DcpSafetensorsError
from dcp_safetensors.layout import natural_key
from dcp_safetensors.names import TRAINING_STATE_DIR
from dcp_safetensors.objects import is_json_exact

if TYPE_CHECKING:
    from dcp_safetensors.checkpoint import Checkpoint

__all__ = ["main", "parse_storage_options", "summarize"]

logger = logging.getLogger("dcp_safetensors")


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``--storage-option key=value`` arguments as the nested dict fsspec takes.

    A value is parsed as JSON when it is valid JSON (``true``, ``3``,
    ``{"max_attempts": 2}``), else kept as a string; dots in a key nest it.

    Example:
        >>> parse_storage_options(["key=AK", "anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000"])
        {'key': 'AK', 'anon': False, 'client_kwargs': {'endpoint_url': 'http://127.0.0.1:9000'}}
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        path = name.split(".")
        if not sep or not all(path):
            raise ConfigurationError(f"--storage-option {item!r}: expected key=value (nested keys with dots: a.b=value)")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigurationError(f"--storage-option {item!r}: {'.'.join(path[: i + 1])} is already set to a value")
            node = child
        node[path[-1]] = value
    return out


class _ProgressBar:
    """A ``progress(done, total)`` callback drawing a tqdm bar of bytes (MB/s) on stderr."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc = desc
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total == 0:  # nothing to read: no empty bar
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=self.desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=sys.stderr,
                mininterval=0.5,
                dynamic_ncols=True,
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _size(n: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"


def _n(count: int, noun: str) -> str:
    """``"1 file"``, ``"2 files"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned text columns; columns in ``right`` right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return lines


def summarize(ckpt: Checkpoint) -> dict[str, Any]:
    """A JSON-serialisable description of ``ckpt`` (what ``dcp-safetensors inspect --json`` prints).

    ``tensors`` are the weights of the HF files; ``training_state`` the tensors
    kept out of the weight map (``training_state/``); ``aliases`` the tied keys
    saved once (each with the key whose bytes it shares); ``objects`` the
    non-tensor values, each with its type and its ``value`` when JSON holds it
    exactly, else its ``repr``.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> from dcp_safetensors.checkpoint import read_checkpoint
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"w": torch.ones(2, 3)}, d + "/model.safetensors")
        >>> s = summarize(read_checkpoint(d))
        >>> s["written_by"], s["tensors"][0], s["totals"]["tensor_bytes"]
        ('other', {'key': 'w', 'dtype': 'F32', 'shape': [2, 3], 'bytes': 24, 'file': 'model.safetensors'}, 24)
    """
    files = []
    count: dict[str, int] = {}
    tensor_bytes: dict[str, int] = {}
    stored = {k: loc for k, loc in ckpt.tensors.items() if k not in ckpt.aliases}
    pieces = [c.location for t in ckpt.chunked.values() for c in t.chunks]
    for loc in [*stored.values(), *pieces]:
        count[loc.file] = count.get(loc.file, 0) + 1
        tensor_bytes[loc.file] = tensor_bytes.get(loc.file, 0) + loc.nbytes
    for name in sorted(ckpt.headers, key=natural_key):
        h = ckpt.headers[name]
        entry: dict[str, Any] = {
            "name": name,
            "size": h.file_size,
            "tensors": count.get(name, 0),
            "tensor_bytes": tensor_bytes.get(name, 0),
        }
        if name in ckpt.checksums:
            entry["checksum"] = ckpt.checksums[name]
        if name in ckpt.blocks:
            entry["blocks"] = len(ckpt.blocks[name].starts)
        files.append(entry)
    model: list[dict[str, Any]] = []
    state: list[dict[str, Any]] = []
    for key in sorted(stored, key=natural_key):
        loc = stored[key]
        row = {"key": key, "dtype": loc.dtype, "shape": list(loc.shape), "bytes": loc.nbytes, "file": loc.file}
        (state if loc.file.startswith(TRAINING_STATE_DIR + "/") else model).append(row)
    for key in sorted(ckpt.chunked, key=natural_key):
        t = ckpt.chunked[key]
        model.append({
            "key": key, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "file": t.chunks[0].location.file,
            "pieces": [{"file": c.location.file, "offsets": list(c.offsets), "shape": list(c.location.shape)} for c in t.chunks],
        })
    model.sort(key=lambda row: natural_key(row["key"]))
    objects = []
    for key in sorted(ckpt.objects, key=natural_key):
        value = ckpt.objects[key]
        shown = {"value": value} if is_json_exact(value) else {"repr": repr(value)[:1000]}
        objects.append({"key": key, "type": type(value).__name__, **shown})
    return {
        "path": ckpt.root,
        "written_by": "dcp_safetensors" if ckpt.written_by_us else "other",
        "format_version": ckpt.format_version,
        "snapshot": ckpt.snapshot,
        "model_prefix": ckpt.model_prefix,
        "files": files,
        "tensors": model,
        "training_state": state,
        "objects": objects,
        "aliases": [{"key": a, "same_as": ckpt.aliases[a]} for a in sorted(ckpt.aliases, key=natural_key)],
        "totals": {
            "tensors": len(model),
            "training_state_tensors": len(state),
            "objects": len(objects),
            "tensor_bytes": sum(r["bytes"] for r in model + state),
            "file_bytes": sum(f["size"] for f in files),
            "files": len(files),
            "blocks": sum(f.get("blocks", 0) for f in files),
            "longest_block": max((int(np.diff(np.append(t.starts, t.size)).max()) for t in ckpt.blocks.values() if len(t.starts)),
                                 default=0),
        },
    }


def _inspect_text(s: dict[str, Any]) -> str:
    totals = s["totals"]
    who = f"dcp_safetensors (format {s['format_version']})" if s["written_by"] == "dcp_safetensors" else "another tool"
    if any(len(r.get("pieces", ())) > 1 for r in s["tensors"]):
        who = "torch's HuggingFaceStorageWriter, per rank (no index; tensors in pieces)"
    lines = [
        f"path          {s['path']}",
        f"written by    {who}",
        f"snapshot      {s['snapshot'] or '-'}",
        f"model prefix  {s['model_prefix'] or '-'}",
        f"files         {totals['files']}, {_size(totals['file_bytes'])} on storage",
        f"blocks        {totals['blocks']}, up to {_size(totals['longest_block'])}, each with its CRC-32: every load checks "
        f"what it reads" if totals["blocks"] else "blocks        none recorded: loads cannot check the bytes they read",
        f"tensors       {_n(totals['tensors'], 'weight')}, {_n(totals['training_state_tensors'], 'training-state tensor')}, "
        f"{_size(totals['tensor_bytes'])}; {_n(totals['objects'], 'non-tensor value')}",
        "",
    ]
    lines += _table(
        ["FILE", "SIZE", "TENSORS", "BLOCKS", "CHECKSUM"],
        [[f["name"], _size(f["size"]), f["tensors"], f.get("blocks", "-"), f.get("checksum", "-")] for f in s["files"]],
        right=(1, 2, 3),
    )

    def tensor_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
        def where(r: dict[str, Any]) -> str:
            n = len(r.get("pieces", ()))
            return r["file"] if n < 2 else f"{n} pieces: {r['file']} ..."

        return [[r["key"], r["dtype"], "[" + ", ".join(map(str, r["shape"])) + "]", _size(r["bytes"]), where(r)] for r in rows]

    if s["tensors"]:
        lines += ["", *_table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "FILE"], tensor_rows(s["tensors"]), right=(3,))]
    if s["training_state"]:
        lines += [
            "",
            *_table(["TRAINING-STATE TENSOR", "DTYPE", "SHAPE", "SIZE", "FILE"], tensor_rows(s["training_state"]), right=(3,)),
        ]
    if s["aliases"]:
        lines += ["", *_table(["TIED KEY", "SAME AS"], [[a["key"], a["same_as"]] for a in s["aliases"]])]
    if s["objects"]:
        rows = []
        for o in s["objects"]:
            value = json.dumps(o["value"]) if "value" in o else o["repr"]
            rows.append([o["key"], o["type"], value if len(value) <= 80 else value[:77] + "..."])
        lines += ["", *_table(["VALUE", "TYPE", "CONTENT"], rows)]
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dcp_safetensors.checkpoint import read_checkpoint

    summary = summarize(read_checkpoint(args.path, storage_options=args.storage_options))
    print(json.dumps(summary, indent=2) if args.json else _inspect_text(summary))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from dcp_safetensors.verification import verify_all

    bar = _ProgressBar("verify", not args.no_progress)
    try:
        report = verify_all(args.path, storage_options=args.storage_options, progress=bar, read_data=args.read_data)
    finally:
        bar.close()
    if not report.ok:
        for problem in report.problems:
            print(f"FAILED: {type(problem).__name__}: {problem}", file=sys.stderr)
        n = len(report.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found in {args.path}", file=sys.stderr)
        return 1
    ckpt = report.checkpoint
    assert ckpt is not None
    what = f"{_n(len(ckpt.tensors) + len(ckpt.chunked), 'tensor')} in {_n(len(ckpt.headers), 'file')}"
    if ckpt.snapshot is not None:
        what += f", snapshot {ckpt.snapshot}"
    if ckpt.chunked:
        checked = ("torch's per-rank files, which record no checksums: every header, and that each tensor's pieces "
                   "cover it exactly once, checked; the bytes not")
    elif not ckpt.written_by_us:
        checked = ("written by another tool, which recorded no checksums: the index, the headers and every tensor's "
                   "offsets and sizes checked, the bytes not")
    else:
        read = report.files_checked - report.files_checked_by_store
        blocks = sum(len(t.starts) for t in ckpt.blocks.values())
        what_matches = f"every file, and of each of the {_n(blocks, 'block')} they are cut into," if blocks else "every file"
        checked = f"the CRC-32 of {what_matches} matches the one recorded at save ({_n(read, 'file')} read, {_size(report.bytes_checked)}"
        if report.files_checked_by_store:
            checked += f"; {_n(report.files_checked_by_store, 'file')} by the store's full-object CRC-32, without reading"
        checked += ")"
    print(f"OK: {what}; {checked}")
    return 0


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system (a fixed mmap threshold).

    By default glibc raises its mmap threshold to the largest block freed so
    far, so after the first tensor every tensor-sized block comes from the
    heap, which fragments and keeps a few tensors' worth of memory resident.
    A streaming conversion allocates and frees one tensor after another.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return


def _cmd_convert(args: argparse.Namespace) -> int:
    from dcp_safetensors.convert import convert

    _return_freed_memory()
    bar = _ProgressBar("convert", not args.no_progress)
    try:
        result = convert(
            args.src,
            args.dst,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            model_prefix=args.model_prefix,
            storage_options=args.storage_options,
            progress=bar,
        )
    finally:
        bar.close()
    rate = result.bytes_written / 1e6 / max(result.seconds, 1e-9)
    cast = f", {len(result.casts)} cast to {args.dtype}" if result.casts else ""
    weights = len(result.weight_files)
    files = _n(weights, "weight file")
    if len(result.files) > weights:
        files += f" and {_n(len(result.files) - weights, 'training-state file')}"
    print(
        f"converted {_n(result.tensors, 'tensor')}{cast} and {_n(result.objects, 'non-tensor value')} into "
        f"{files} at {result.path} ({_size(result.bytes_written)} in {result.seconds:.2f} s, "
        f"{rate:.0f} MB/s), snapshot {result.snapshot}"
    )
    if result.model_prefix_detected:
        print(f"model prefix {result.model_prefix!r} detected: {result.model_prefix}.* are the HF weights, the other "
              "keys (optimizer state) went to training_state/; --model-prefix chooses another")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcp-safetensors",
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 success, 1 failed check or error, 2 bad usage, 130 interrupted",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (logger dcp_safetensors)")
    # The same flags after the subcommand; SUPPRESS keeps a subcommand from resetting -v given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="storage_option",
        help="fsspec option for s3:// paths (repeat; JSON values; nested keys with dots, "
        "e.g. client_kwargs.endpoint_url=http://host:9000)",
    )
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="2-rank FSDP2 save and resharding load on the local filesystem")
    demo.add_argument("path", nargs="?", help="checkpoint directory (default: a new temporary one)")
    demo.add_argument("--hidden", type=int, default=1024, help="model width (default 1024: ~150 MB of fp32)")

    inspect = sub.add_parser(
        "inspect", parents=[common, storage], help="list a checkpoint's files, tensors, snapshot and training state"
    )
    inspect.add_argument("path", help="checkpoint directory or s3:// URL")
    inspect.add_argument("--json", action="store_true", help="print one JSON document")

    verify = sub.add_parser(
        "verify", parents=[common, storage, quiet], help="check a checkpoint's structure and every checksum"
    )
    verify.add_argument("path", help="checkpoint directory or s3:// URL")
    verify.add_argument("--read-data", action="store_true",
                        help="read every byte, also of objects whose store keeps a checked full-object CRC-32 (S3)")

    convert = sub.add_parser(
        "convert",
        parents=[common, storage, quiet],
        help="write a .distcp or safetensors checkpoint as HF safetensors (re-shard, cast), streaming",
    )
    convert.add_argument("src", help="a torch .distcp directory or a safetensors checkpoint (directory or s3:// URL)")
    convert.add_argument("dst", help="destination directory or s3:// URL")
    convert.add_argument("--max-shard-size", default="5GB", help="most tensor bytes per file (default 5GB)")
    convert.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating tensors (F64/F32/F16/BF16); others keep theirs"
    )
    convert.add_argument(
        "--model-prefix",
        metavar="P",
        help='keys under "P." go to the HF files without the prefix, other tensors to training_state/',
    )
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": _cmd_inspect,
    "verify": _cmd_verify,
    "convert": _cmd_convert,
}


def _error_of(e: BaseException) -> BaseException:
    """The error inside DCP's ``CheckpointException`` (the first failing rank's), or ``e`` itself."""
    # Only a command that ran DCP can raise its exception; the others never import torch.
    api = sys.modules.get("torch.distributed.checkpoint.api")
    if api is not None and isinstance(e, api.CheckpointException) and e.failures:
        first = e.failures[min(e.failures)]
        return first[0] if isinstance(first, tuple) else first
    return e


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dcp-safetensors`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:
        logger.setLevel(logging.INFO)

    if args.command == "demo":
        from dcp_safetensors.demo import run_demo

        run_demo(args.path, hidden=args.hidden)
        return 0
    try:
        args.storage_options = parse_storage_options(args.storage_option)
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        error = _error_of(e)
        if not isinstance(error, (DcpSafetensorsError, OSError, EOFError)):
            raise
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
