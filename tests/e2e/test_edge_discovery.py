"""What generic tools find on a kvstore server: both versions of gRPC server
reflection, and a health answer for every documented name."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from serverproc import ServerProcess

# grpc.reflection.v1 is v1alpha under a new package name: same messages and
# field numbers, so v1alpha's generated classes speak both.
REFLECTION = ["grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"]


@pytest.fixture
def channel(shared_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_server.tcp) as ch:
        yield ch


def reflect(channel: grpc.Channel, service: str,
            request: reflection_pb2.ServerReflectionRequest) \
        -> reflection_pb2.ServerReflectionResponse:
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    [response] = list(call(iter([request]), timeout=30))
    return response


@pytest.mark.parametrize("service", REFLECTION)
def test_reflection_lists_and_describes_the_service(channel: grpc.Channel,
                                                    service: str) -> None:
    listed = reflect(channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"kvstore.v1.KVStore", "grpc.health.v1.Health"} <= names
    described = reflect(channel, service, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="kvstore.v1.KVStore"))
    assert described.file_descriptor_response.file_descriptor_proto


def health(channel: grpc.Channel, name: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status


def test_health_names_without_l3(channel: grpc.Channel) -> None:
    assert health(channel, "") == health_pb2.HealthCheckResponse.SERVING
    assert health(channel, "kvstore.v1.KVStore") == health_pb2.HealthCheckResponse.SERVING
    # No L3 configured: a definite NOT_SERVING (ack=remote cannot be served),
    # not NOT_FOUND, so a probe or a Watch on the documented name gets an answer.
    assert health(channel, "kvstore.v1.KVStore/L3") == health_pb2.HealthCheckResponse.NOT_SERVING
