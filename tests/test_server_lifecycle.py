"""Restarts and crashes: the index comes back from the store; a dead worker is replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.app import FaceGateServer, build_server
from facegate_server.config import load_settings

from tests.conftest import Faces


def start(data: Path, workers: int = 1) -> FaceGateServer:
    server = build_server(load_settings({}, listen="127.0.0.1:0", data_dir=data, workers=workers))
    server.start()
    return server


def identify(server: FaceGateServer, image: bytes) -> pb.IdentifyResponse:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.FaceGateServiceStub(channel)
        response: pb.IdentifyResponse = stub.Identify(
            pb.IdentifyRequest(image=image, turnstile_id="gate-1"), timeout=30
        )
        return response


def test_members_survive_a_restart(tmp_path: Path, faces: Faces) -> None:
    first = start(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            pb_grpc.FaceGateServiceStub(channel).Enroll(
                pb.EnrollRequest(member_id="m-1001", photos=[faces.read("people/joe_biden/1.jpg")]),
                timeout=30,
            )
    finally:
        first.stop(grace=1)
    second = start(tmp_path)
    try:
        response = identify(second, faces.read("people/joe_biden/2.jpg"))
        assert (response.decision, response.member_id) == (pb.DECISION_GRANTED, "m-1001")
    finally:
        second.stop(grace=1)


def test_a_killed_worker_is_replaced(tmp_path: Path, faces: Faces) -> None:
    server = start(tmp_path)
    try:
        frame = faces.read("people/lin_manuel_miranda/1.png")
        assert identify(server, frame).decision == pb.DECISION_DENIED_UNKNOWN_FACE
        for pid in server.pool.pids():  # a dlib crash, as seen from outside
            os.kill(pid, signal.SIGKILL)
        unavailable = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                decision = identify(server, frame).decision
                break
            except grpc.RpcError as error:  # while the new workers load their models
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                unavailable += 1
                time.sleep(0.2)
        assert unavailable > 0
        assert decision == pb.DECISION_DENIED_UNKNOWN_FACE
    finally:
        server.stop(grace=1)


def test_an_unusable_listen_address_fails_to_build(tmp_path: Path) -> None:
    # --insecure: without it, an open server on a public address is refused before binding.
    settings = load_settings(
        {}, listen="203.0.113.1:0", data_dir=tmp_path, workers=1, insecure=True
    )
    with pytest.raises(RuntimeError, match=r"203\.0\.113\.1"):
        build_server(settings)
