"""grpc.health.v1 and server reflection, including a client built from reflection alone."""

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = "mu.v1.Controller"


def test_health_is_serving(connected) -> None:
    stub = health_pb2_grpc.HealthStub(connected.channel)
    for name in ("", SERVICE):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _reflect(channel: grpc.Channel, **request) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5
    )
    return reply


def test_reflection_lists_services(connected) -> None:
    reply = _reflect(connected.channel, list_services="")
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_generic_client_calls_act_through_reflection(connected) -> None:
    """Act as a tool that knows nothing of mu: descriptors from the server, messages built here."""
    reply = _reflect(connected.channel, file_containing_symbol=SERVICE)
    pool = descriptor_pool.DescriptorPool()
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    pending = {f.name: f for f in files}
    while pending:  # add dependencies before dependents
        for name, proto in list(pending.items()):
            if all(dep not in pending for dep in proto.dependency):
                pool.Add(proto)
                del pending[name]
    method = pool.FindServiceByName(SERVICE).methods_by_name["Act"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    act = connected.channel.unary_unary(
        f"/{SERVICE}/Act",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    response = act(request_cls(obs=[0.0] * 26, seq=7), timeout=5)
    assert response.seq == 7 and response.policy_version == 1 and len(response.action) == 6


def test_undecodable_bytes_are_invalid_argument_on_health_and_reflection(connected) -> None:
    """Servicers that are not ours get the same guard as mu.v1 (UNKNOWN before)."""
    channel, garbage = connected.channel, b"\xff\xff\xff\xff"  # raw bytes: no serializer
    calls = {
        "Check": lambda: channel.unary_unary("/grpc.health.v1.Health/Check")(garbage, timeout=10),
        "Watch": lambda: next(
            channel.unary_stream("/grpc.health.v1.Health/Watch")(garbage, timeout=10)
        ),
        "ServerReflectionInfo": lambda: next(
            channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                iter([garbage]), timeout=10
            )
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "does not decode as" in e.value.details(), name
    # the guarded servicers still answer good requests, streamed ones included
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert SERVICE in {
        s.name for s in _reflect(channel, list_services="").list_services_response.service
    }
