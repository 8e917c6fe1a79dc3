"""Server reflection (``nba serve --reflection``) answers as grpc.reflection.v1 and as v1alpha, through a
real server: current tools (grpcurl, grpc_cli, Postman) ask v1 first, older ones only know v1alpha."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from engine.config import Config
from engine.serving.app import App
from engine.serving.server import build_server

from .conftest import RULES_DIR, local_auth

pytestmark = pytest.mark.service

PATHS = {"v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
         "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}


@contextlib.contextmanager
def reflecting(redis_url: str, models_dir: Path, tmp_path: Path) -> Iterator[grpc.Channel]:
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    app = App(Config(redis_url=redis_url, rules_dir=rules_dir, models_dir=models_dir, demo_customers=100,
                     metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0)).start()
    server, port, _ = build_server(app, "127.0.0.1:0", auth=local_auth(), reflection=True)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(0).wait()
        app.close()


def _ask(channel: grpc.Channel, version: str, **request: str) -> reflection_pb2.ServerReflectionResponse:
    # the v1 messages are v1alpha's field for field, so v1alpha's classes speak both
    call = channel.stream_stream(PATHS[version], request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    (reply,) = list(call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5))
    return reply


def test_reflection_v1_and_v1alpha_both_list_the_services(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    with reflecting(redis_url, models_dir, tmp_path) as channel:
        listed = {version: {s.name for s in _ask(channel, version, list_services="").list_services_response.service}
                  for version in PATHS}
        assert listed["v1"] == listed["v1alpha"]
        assert {"nba.v1.DecisionService", "nba.v1.AdminService", "nba.v1.ProfileService", "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= listed["v1"]

        for version, symbol, file in (("v1", "nba.v1.DecisionService", "nba/v1/nba.proto"),
                                      ("v1", "grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto"),
                                      ("v1alpha", "nba.v1.DecisionService", "nba/v1/nba.proto")):
            reply = _ask(channel, version, file_containing_symbol=symbol)
            assert not reply.HasField("error_response"), (version, symbol, reply.error_response)
            names = [descriptor_pb2.FileDescriptorProto.FromString(b).name
                     for b in reply.file_descriptor_response.file_descriptor_proto]
            assert file in names, (version, symbol, names)
