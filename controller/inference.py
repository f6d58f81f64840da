"""The Open Inference Protocol (KServe v2 / Triton gRPC) for the served policy.

`inference.GRPCInferenceService` beside `mu.v1.Controller` on the same port, so tools that speak
the standard protocol (tritonclient.grpc, KServe clients, perf_analyzer) get actions without
mu's client. One model, named MODEL_NAME; its version is the policy version ("1", "2", ...), and
a hot swap or rollback changes it just as it changes `policy_version` on Act.

    input  "obs"    FP32 [batch, obs_dim]   (contents.fp32_contents or raw_input_contents)
    output "action" FP32 [batch, act_dim]   (returned the way the input came: raw or contents)

Validation, clamping and the NaN guard are Policy.act / Policy.act_batch, exactly as for Act and
ActBatch; refusals are gRPC status codes with the same messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from time import perf_counter

import grpc
import numpy as np

from controller.contract import INPUT_NAME, OUTPUT_NAME
from controller.decoding import clipped
from controller.metrics import Metrics
from controller.policy import ActError, Policy
from controller.proto import grpc_service_pb2 as pb
from controller.proto import grpc_service_pb2_grpc as pb_grpc
from controller.service import packed_floats, refuse
from controller.store import PolicyStore

INFERENCE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL_NAME = "mu-policy"
PLATFORM = "onnxruntime_onnx"
DATATYPE = "FP32"
_FLOAT32_LE = np.dtype("<f4")
_FP32_FIELD = pb.InferTensorContents.DESCRIPTOR.fields_by_name["fp32_contents"].number


def _server_version() -> str:
    try:
        return version("mu-control")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0"


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The six core RPCs of the protocol; every other one answers UNIMPLEMENTED."""

    def __init__(self, store: PolicyStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._server_version = _server_version()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        # The store always holds a validated policy: a server that answers can infer.
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mu", version=self._server_version, extensions=[])

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        ready = _model_error(self._store.current, request.name, request.version) is None
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        policy = self._store.current
        error = _model_error(policy, request.name, request.version)
        if error is not None:
            await context.abort(grpc.StatusCode.NOT_FOUND, error)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=MODEL_NAME,
            versions=[str(policy.version)],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype=DATATYPE, shape=[-1, policy.obs_dim])],
            outputs=[tensor(name=OUTPUT_NAME, datatype=DATATYPE, shape=[-1, policy.act_dim])],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        t0 = perf_counter()
        policy = self._store.current
        try:
            obs, batch, raw = _read_input(policy, request)
            if batch == 1:
                actions = policy.act(obs)[np.newaxis]
            else:
                actions = policy.act_batch(obs, batch)
        except ActError as e:
            refused = e.code, e.message  # answered outside the except: see refuse()
        else:
            return self._reply(request, policy, actions, batch, raw, t0)
        await refuse(context, refused, self._metrics, "ModelInfer", t0)

    def _reply(
        self,
        request: pb.ModelInferRequest,
        policy: Policy,
        actions: np.ndarray,
        batch: int,
        raw: bool,
        t0: float,
    ) -> pb.ModelInferResponse:
        output = pb.ModelInferResponse.InferOutputTensor(
            name=OUTPUT_NAME, datatype=DATATYPE, shape=[batch, policy.act_dim]
        )
        if raw:
            raw_output = [actions.astype(_FLOAT32_LE, copy=False).tobytes()]
        else:
            raw_output = []
            output.contents.MergeFromString(packed_floats(_FP32_FIELD, actions))
        reply = pb.ModelInferResponse(
            model_name=MODEL_NAME,
            model_version=str(policy.version),
            id=request.id,
            outputs=[output],
            raw_output_contents=raw_output,
        )
        self._metrics.ok("ModelInfer", perf_counter() - t0)
        return reply


def _model_error(policy: Policy, name: str, model_version: str) -> str | None:
    """Why (name, version) does not name the served policy, or None when it does."""
    if name != MODEL_NAME:
        return f"no model {clipped(name)!r}; this server serves {MODEL_NAME!r}"
    if model_version not in ("", str(policy.version)):
        return (
            f"{MODEL_NAME} version {clipped(model_version)!r} is not served; the current "
            f"version is {policy.version} (leave model_version empty to always get the current one)"
        )
    return None


def _read_input(policy: Policy, request: pb.ModelInferRequest) -> tuple[Sequence[float], int, bool]:
    """The request's observations, flat and row-major, the batch size, and whether they came
    as raw bytes (Python floats either way: Policy.act sums them in double precision).

    Raises ActError (INVALID_ARGUMENT or NOT_FOUND) naming what is wrong.
    """
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    error = _model_error(policy, request.model_name, request.model_version)
    if error is not None:
        raise ActError(grpc.StatusCode.NOT_FOUND, error)
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        names = clipped(str([i.name for i in request.inputs]))
        raise ActError(invalid, f"{MODEL_NAME} takes one input {INPUT_NAME!r}; got {names}")
    unknown = [o.name for o in request.outputs if o.name != OUTPUT_NAME]
    if unknown:
        raise ActError(
            invalid, f"{MODEL_NAME} has one output {OUTPUT_NAME!r}; got {clipped(str(unknown))}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != DATATYPE:
        raise ActError(
            invalid, f"input {INPUT_NAME!r} must be {DATATYPE}, got {clipped(tensor.datatype)!r}"
        )
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != policy.obs_dim:
        raise ActError(
            invalid,
            f"input {INPUT_NAME!r} has shape {clipped(str(shape))}; {MODEL_NAME} expects "
            f"[batch, {policy.obs_dim}] with batch >= 1"
            + (policy.stateless_hint(shape[1]) if len(shape) == 2 else ""),
        )
    batch = shape[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise ActError(
                invalid,
                f"raw_input_contents has {len(request.raw_input_contents)} entries; "
                "one input needs one",
            )
        data = request.raw_input_contents[0]
        if len(data) != 4 * batch * policy.obs_dim:
            raise ActError(
                invalid,
                f"raw_input_contents holds {len(data)} bytes; shape {shape} in FP32 needs "
                f"{4 * batch * policy.obs_dim}",
            )
        values = np.frombuffer(data, _FLOAT32_LE)
        # One observation: Python floats (Policy.act sums them in double precision); a batch
        # stays an array (act_batch checks it with numpy).
        return (values.tolist() if batch == 1 else values), batch, True
    values = tensor.contents.fp32_contents
    if len(values) != batch * policy.obs_dim:
        raise ActError(
            invalid,
            f"input {INPUT_NAME!r} has {len(values)} fp32_contents values; shape {shape} "
            f"needs {batch * policy.obs_dim}",
        )
    return values, batch, False
