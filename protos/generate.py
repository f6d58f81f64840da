"""Generate the Python gRPC code for protos/mu/v1/*.proto (mu's own contract) and
protos/inference/*.proto (the Open Inference Protocol) into controller/proto/.

grpc_tools emits `from mu.v1 import controller_pb2`, which only resolves with protos/ on
sys.path; the import is rewritten to the package path so `controller.proto` is self-contained.
Run from anywhere: `python protos/generate.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "controller" / "proto"
PACKAGE = "controller.proto"
PROTO_DIRS = (Path("mu") / "v1", Path("inference"))
INIT_TEXT = (
    '"""Generated gRPC code for protos/mu/v1 and protos/inference '
    '(do not edit; run protos/generate.py)."""\n'
)


def _protoc(proto_files: list[Path], out: Path) -> None:
    from grpc_tools import protoc  # a dev dependency, so imported only here

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write the generated modules (flat, one per proto file and kind) into `out`."""
    proto_files = sorted(p for d in PROTO_DIRS for p in (PROTO_ROOT / d).glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(proto_files, Path(tmp))
        generated_files = sorted(f for d in PROTO_DIRS for f in (Path(tmp) / d).iterdir())
        for generated in generated_files:
            text = re.sub(
                r"^from (mu\.v1|inference) import ",
                f"from {PACKAGE} import ",
                generated.read_text(),
                flags=re.MULTILINE,
            )
            target = out / generated.name
            target.write_text(text)
            written.append(target)
    init = out / "__init__.py"
    init.write_text(INIT_TEXT)
    written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
