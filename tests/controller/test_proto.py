"""The committed generated code matches protos/: regenerate into a temp dir and compare."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_inference_imports_use_package_path() -> None:
    text = (COMMITTED / "grpc_service_pb2_grpc.py").read_text()
    assert "from controller.proto import grpc_service_pb2" in text
    assert "from inference import" not in text


# Run in a subprocess: tritonclient's own `inference` protos cannot share a process with ours.
DUMP_FIELDS = """
import json, sys, importlib
module = importlib.import_module(sys.argv[1])
out = {}
def walk(message, prefix):
    for f in message.fields:
        out[f"{prefix}{message.name}.{f.name}"] = [f.number, f.type, f.is_repeated]
    for nested in message.nested_types:
        walk(nested, f"{prefix}{message.name}.")
for message in module.DESCRIPTOR.message_types_by_name.values():
    walk(message, "")
service = module.DESCRIPTOR.services_by_name["GRPCInferenceService"]
for m in service.methods:
    out[f"rpc {service.full_name}/{m.name}"] = [m.input_type.full_name, m.output_type.full_name]
print(json.dumps(out))
"""


def _fields(module: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", DUMP_FIELDS, module], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None, reason="needs the dev extra (tritonclient)"
)
def test_inference_proto_matches_the_published_protocol() -> None:
    """Every message, field (name, number, type) and RPC we declare is tritonclient's too."""
    ours = _fields("controller.proto.grpc_service_pb2")
    theirs = _fields("tritonclient.grpc.service_pb2")
    assert len(ours) > 60
    assert {k: theirs.get(k) for k in ours} == ours
