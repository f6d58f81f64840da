"""The committed generated code matches protos/: regenerate into a temp dir and compare."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "controller" / "proto"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "mu_protos_generate", REPO / "protos" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(
        p.name for p in COMMITTED.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
    )
    assert names == committed
    stale = [n for n in names if (tmp_path / n).read_text() != (COMMITTED / n).read_text()]
    assert not stale, f"{stale} are stale: run `python protos/generate.py` (make protos)"


def test_generated_imports_use_package_path() -> None:
    text = (COMMITTED / "controller_pb2_grpc.py").read_text()
    assert "from controller.proto import controller_pb2" in text
    assert "from mu.v1 import" not in text
