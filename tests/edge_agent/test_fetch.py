"""edge_agent/fetch.py: a bundle downloaded over the gRPC agent channel (`FetchArtifact`) against the real cloud,
equal to the HTTP download; resumed from the bytes an earlier try left (the offset asked is the bytes already
there); refused past its trusted length, for an unknown target and for a partial file longer than the bundle; and
HTTP taken when the channel cannot serve."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest

from edgefleet.edge_agent.cloud_client import CloudClient
from edgefleet.edge_agent.errors import BundleError, CloudUnavailable
from edgefleet.edge_agent.fetch import GrpcBundleFetcher, HttpBundleFetcher
from edgefleet.edge_agent.link_grpc import GrpcLink
from edgefleet.protos.messages import SignedDesiredState, parse_message
from tests.cloud_server import enroll_device, start_cloud_server, tiny_onnx
from tests.netproxy import DelayProxy


class Recording:
    """A GrpcLink's fetch_artifact, each call's offset recorded; `stop_after` chunks and the stream breaks."""

    def __init__(self, link: GrpcLink, stop_after: int | None = None) -> None:
        self.link, self.stop_after, self.offsets = link, stop_after, []

    def fetch_artifact(self, target: str, offset: int):
        self.offsets.append(offset)
        for n, chunk in enumerate(self.link.fetch_artifact(target, offset)):
            if self.stop_after is not None and n == self.stop_after:
                import grpc

                class Broken(grpc.RpcError):
                    def code(self) -> Any:
                        return grpc.StatusCode.UNAVAILABLE

                    def details(self) -> str:
                        return "connection reset (test)"

                raise Broken()
            yield chunk


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cloud with the agent channel, a device enrolled and a big-enough model deployed to it: (cloud, enrollment,
    link, the bundle's target path, its bytes over HTTP)."""
    root = tmp_path_factory.mktemp("fetch")
    cloud = start_cloud_server(root / "cloud", agent_channel_port=0)
    try:
        with cloud.client() as admin:
            enrollment = enroll_device(admin, "dev-f")
            # A model of 256 x 600 floats: a bundle of a few hundred KB, several 64 KiB chunks.
            r = admin.post("/api/v1/models", params={"name": "wide"}, content=tiny_onnx(256, 600),
                           headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            r = admin.post("/api/v1/deployments", json={"model": "wide", "device_id": "dev-f"})
            assert r.status_code == 201, r.text
        got: queue.Queue[bytes] = queue.Queue()
        target = f"127.0.0.1:{cloud.runtime.agent_channel.port}"
        watcher = GrpcLink(target, "dev-f", enrollment.device_token, on_desired=got.put, on_connected=lambda: None,
                           retry_initial_s=0.05, retry_max_s=0.3)
        watcher.start()
        try:
            while True:  # the first push may predate the deployment's bundle build
                doc = parse_message(got.get(timeout=30), SignedDesiredState)
                models = doc.payload.models
                if models:
                    break
        finally:
            watcher.stop(graceful=False)
        path = models[0].bundle_target
        link = GrpcLink(target, "dev-f", enrollment.device_token, on_desired=lambda raw: None,
                        on_connected=lambda: None)
        client = CloudClient(cloud.base_url)
        client.set_token(enrollment.device_token)
        http = HttpBundleFetcher(client, enrollment.tuf_targets_url, 1 << 30)
        via_http = root / "http.tar.gz"
        http.fetch(path, via_http)
        yield cloud, link, http, path, via_http.read_bytes()
        client.close()
    finally:
        cloud.stop()


class NoHttp(HttpBundleFetcher):
    def __init__(self) -> None:
        self.calls = 0

    def fetch(self, target_path: str, dest: Path, *, expected_length: int | None = None) -> None:
        self.calls += 1
        raise CloudUnavailable("no HTTP in this test")


def test_a_bundle_over_the_channel_equals_the_http_download(world, tmp_path):
    _, link, _, path, want = world
    assert len(want) > 2 * 64 * 1024  # three chunks at least
    fallback = NoHttp()
    fetcher = GrpcBundleFetcher(lambda: link, fallback, 1 << 30)
    dest = tmp_path / "b.tar.gz"
    fetcher.fetch(path, dest, expected_length=len(want))
    assert dest.read_bytes() == want and fetcher.fetched_over_grpc == 1 and fallback.calls == 0
    assert not dest.with_name(dest.name + ".part").exists()


def test_a_broken_download_resumes_from_the_bytes_it_has(world, tmp_path):
    _, link, _, path, want = world
    broken = Recording(link, stop_after=1)
    fetcher = GrpcBundleFetcher(lambda: broken, None, 1 << 30)
    dest = tmp_path / "b.tar.gz"
    with pytest.raises(CloudUnavailable, match="interrupted"):
        fetcher.fetch(path, dest, expected_length=len(want))
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size
    assert 0 < have < len(want) and part.read_bytes() == want[:have]  # what came is kept
    whole = Recording(link)
    GrpcBundleFetcher(lambda: whole, None, 1 << 30).fetch(path, dest, expected_length=len(want))
    assert whole.offsets == [have] and dest.read_bytes() == want  # asked for the rest only


def test_refusals_past_the_trusted_length_an_unknown_target_and_a_partial_file_too_long(world, tmp_path):
    _, link, _, path, want = world
    fetcher = GrpcBundleFetcher(lambda: link, NoHttp(), 1 << 30)
    dest = tmp_path / "b.tar.gz"
    with pytest.raises(BundleError, match="trusted length"):
        fetcher.fetch(path, dest, expected_length=len(want) - 1)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    with pytest.raises(BundleError, match="does not exist"):
        fetcher.fetch("bundles/nothing/v9/rpi4.tar.gz", dest, expected_length=10)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(b"x" * (len(want) + 5))  # longer than the bundle: it cannot be its start
    no_fallback = GrpcBundleFetcher(lambda: link, None, 1 << 30)
    with pytest.raises(CloudUnavailable):
        no_fallback.fetch(path, dest, expected_length=len(want) + 10)
    assert not part.exists()
    no_fallback.fetch(path, dest, expected_length=len(want))
    assert dest.read_bytes() == want


def test_http_is_taken_when_the_channel_cannot_serve(world, tmp_path):
    _, _, http, path, want = world
    dead = GrpcLink("127.0.0.1:9", "dev-f", "tok", on_desired=lambda raw: None, on_connected=lambda: None,
                    keepalive_s=1.0, keepalive_timeout_s=1.0)
    fetcher = GrpcBundleFetcher(lambda: dead, http, 1 << 30)
    dest = tmp_path / "b.tar.gz"
    fetcher.fetch(path, dest, expected_length=len(want))
    assert dest.read_bytes() == want and fetcher.fetched_over_grpc == 0
    no_link = GrpcBundleFetcher(lambda: None, http, 1 << 30)
    dest.unlink()
    no_link.fetch(path, dest, expected_length=len(want))
    assert dest.read_bytes() == want
    with pytest.raises(CloudUnavailable, match="no HTTP fallback"):
        GrpcBundleFetcher(lambda: None, None, 1 << 30).fetch(path, tmp_path / "c.tar.gz", expected_length=10)


def test_a_download_cut_by_the_network_resumes_over_the_channel_from_its_bytes(world, tmp_path):
    """A real connection dropped mid-stream (a proxy that closes after ~140 KB): the fetcher keeps the whole
    chunks that came, and the next fetch asks the cloud for the rest from exactly there."""
    cloud, link, _, path, want = world
    proxy = DelayProxy(cloud.runtime.agent_channel.port, cut_after=140_000)
    try:
        cut = GrpcLink(f"127.0.0.1:{proxy.port}", "dev-f", link._token, on_desired=lambda raw: None,
                       on_connected=lambda: None)
        dest = tmp_path / "b.tar.gz"
        with pytest.raises(CloudUnavailable, match="interrupted"):
            GrpcBundleFetcher(lambda: cut, None, 1 << 30).fetch(path, dest, expected_length=len(want))
    finally:
        proxy.stop()
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size
    assert 0 < have < len(want) and have % (64 * 1024) == 0 and part.read_bytes() == want[:have]
    whole = Recording(link)
    GrpcBundleFetcher(lambda: whole, None, 1 << 30).fetch(path, dest, expected_length=len(want))
    assert whole.offsets == [have] and dest.read_bytes() == want
