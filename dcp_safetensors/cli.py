"""The ``dcp-safetensors`` command line.

Example:
    $ dcp-safetensors demo            # a 2-rank FSDP2 save + resharding load
    $ dcp-safetensors verify PATH     # every check and checksum; exit 0 only if intact
"""

from __future__ import annotations

import argparse
import logging
import sys

from dcp_safetensors.errors import DcpSafetensorsError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dcp-safetensors`` console script."""
    parser = argparse.ArgumentParser(prog="dcp-safetensors", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (logger dcp_safetensors)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="2-rank FSDP2 save and resharding load on the local filesystem")
    demo.add_argument("path", nargs="?", help="checkpoint directory (default: a new temporary one)")
    demo.add_argument("--hidden", type=int, default=1024, help="model width (default 1024: ~150 MB of fp32)")
    verify = sub.add_parser("verify", help="check a checkpoint's structure and every checksum")
    verify.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    if args.command == "demo":
        from dcp_safetensors.demo import run_demo

        run_demo(args.path, hidden=args.hidden)
        return 0
    from dcp_safetensors.checkpoint import verify as verify_checkpoint

    try:
        ckpt = verify_checkpoint(args.path)
    except (DcpSafetensorsError, OSError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"OK: {len(ckpt.tensors)} tensors in {len(ckpt.headers)} files, snapshot {ckpt.snapshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
