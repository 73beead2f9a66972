"""Generate tensorgate's protobuf and gRPC Python modules from ``protos/*.proto``.

This is the only way the ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` files in
``protos/`` are produced; they are committed and never edited by hand.

    python protos/generate.py              # regenerate into protos/
    python protos/generate.py --out DIR    # generate into DIR instead
    python protos/generate.py --check      # exit 1 and list the files that are stale

Every ``*.proto`` next to this script is compiled in one ``grpc_tools.protoc`` run
with ``protos/`` as the import root. protoc writes imports between our own modules
as top-level imports (``import model_config_pb2 as model__config__pb2``); they are
rewritten to package-relative ones (``from . import model_config_pb2 as ...``) so
that the modules load as ``tensorgate.protos.<name>`` and never shadow, or get
shadowed by, another project's top-level ``model_config_pb2``. The output depends
only on the .proto files and the grpcio-tools version, so two runs give identical
bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS_DIR = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_IMPORT_AS = re.compile(r"^import (?P<module>\w+) as (?P<alias>\w+)$", re.MULTILINE)
_FROM_IMPORT = re.compile(r"^from (?P<module>\w+) import ", re.MULTILINE)


class GenerationError(RuntimeError):
    """protoc rejected the .proto files; its diagnostics are on stderr."""


def proto_files(proto_dir: Path = PROTOS_DIR) -> list[Path]:
    """Every .proto file that is compiled, in a stable order."""
    return sorted(proto_dir.resolve().glob("*.proto"))


def is_generated(path: Path) -> bool:
    """Whether ``path`` is named like a file this script writes."""
    return path.name.endswith(GENERATED_SUFFIXES)


def relativize_imports(source: str, own_modules: set[str]) -> str:
    """Turn protoc's top-level imports of ``own_modules`` into package-relative ones.

    Imports of anything else (``grpc``, ``google.protobuf``...) are left alone.
    """

    def import_as(match: re.Match[str]) -> str:
        if match["module"] not in own_modules:
            return match[0]
        return f"from . import {match['module']} as {match['alias']}"

    def from_import(match: re.Match[str]) -> str:
        if match["module"] not in own_modules:
            return match[0]
        return f"from .{match['module']} import "

    return _FROM_IMPORT.sub(from_import, _IMPORT_AS.sub(import_as, source))


def render(proto_dir: Path = PROTOS_DIR) -> dict[str, bytes]:
    """Compile every .proto in ``proto_dir``; return generated file name -> content.

    Raises:
        GenerationError: protoc failed (syntax error, unknown type, bad import...).
    """
    proto_dir = proto_dir.resolve()
    protos = proto_files(proto_dir)
    if not protos:
        raise GenerationError(f"no .proto files in {proto_dir}")
    # The well-known types (google/protobuf/*.proto) ship inside grpcio-tools.
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="tensorgate-protos-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise GenerationError(f"protoc failed on {', '.join(p.name for p in protos)}")
        own_modules = {f"{p.stem}_pb2" for p in protos}
        return {
            out.name: relativize_imports(out.read_text("utf-8"), own_modules).encode("utf-8")
            for out in sorted(Path(tmp).iterdir())
        }


def existing(out_dir: Path) -> dict[str, bytes]:
    """The generated-looking files currently in ``out_dir``."""
    if not out_dir.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if is_generated(p)}


def differences(expected: Mapping[str, bytes], actual: Mapping[str, bytes]) -> list[str]:
    """One line per file that is missing, out of date, or left over from a deleted .proto."""
    lines: list[str] = []
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual:
            lines.append(f"{name}: missing")
        elif name not in expected:
            lines.append(f"{name}: no longer generated (its .proto is gone)")
        elif expected[name] != actual[name]:
            lines.append(f"{name}: out of date")
    return lines


def write(files: Mapping[str, bytes], out_dir: Path) -> list[str]:
    """Make ``out_dir`` hold exactly ``files`` among its generated files.

    Unchanged files are not rewritten. Returns what was done, one line per file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    for name, content in files.items():
        target = out_dir / name
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
            done.append(f"wrote {name}")
    for name in sorted(existing(out_dir).keys() - files.keys()):
        (out_dir / name).unlink()
        done.append(f"removed {name} (its .proto is gone)")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTOS_DIR,
        help="directory to write the generated modules into (default: protos/)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 listing the files in --out that differ from a fresh run",
    )
    args = parser.parse_args(argv)

    try:
        files = render()
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.check:
        stale = differences(files, existing(args.out))
        if stale:
            print(f"generated protobuf code in {args.out} is stale:", file=sys.stderr)
            for line in stale:
                print(f"  {line}", file=sys.stderr)
            print("regenerate with: python protos/generate.py", file=sys.stderr)
            return 1
        print(f"generated protobuf code in {args.out} is up to date")
        return 0

    changes = write(files, args.out)
    for line in changes:
        print(f"  {line}")
    print(f"{len(files)} generated files in {args.out}, {len(changes)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
