"""The committed generated modules are current, and tegrad's protos agree with
Triton's on every message, field number and type they share."""

from __future__ import annotations

import json
import subprocess
import sys

from daemon.protogen import generate, grpc_service_pb2, model_config_pb2
from tests.proto_describe import describe

_TRITON_DUMP = """
import json, sys
sys.path.insert(0, {root!r})
from tritonclient.grpc import service_pb2, model_config_pb2
from tests.proto_describe import describe
print(json.dumps(describe([service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])))
"""


def test_generated_modules_are_current():
    assert generate.check() == [], "run `make protos` and commit the result"


def test_wire_compatible_with_tritonclient():
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    # tritonclient's generated package `inference` cannot be imported next to ours.
    dump = subprocess.run([sys.executable, "-c", _TRITON_DUMP.format(root=root)], capture_output=True, text=True, check=True)
    triton = json.loads(dump.stdout)
    ours = json.loads(json.dumps(describe([grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])))

    assert ours["methods"] == triton["methods"], "every Triton RPC is declared, with the same types"
    for name, fields in ours["messages"].items():
        assert name in triton["messages"], f"{name} is not a Triton message"
        for field, spec in fields.items():
            assert triton["messages"][name].get(field) == spec, f"{name}.{field}: ours {spec}, Triton {triton['messages'][name].get(field)}"
    # The request/response messages must be complete, not a subset: clients fill every field.
    for name in ("inference.ModelInferRequest", "inference.ModelInferResponse", "inference.InferTensorContents",
                 "inference.InferParameter", "inference.ModelStatistics", "inference.InferStatistics"):
        assert ours["messages"][name] == triton["messages"][name], name
    for name, values in ours["enums"].items():
        assert values == triton["enums"][name], name
