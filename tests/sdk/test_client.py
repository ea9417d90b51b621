"""sdk/client.py and sdk/aio.py against a real agent local API on a real unix socket; answers equal bare ONNX
Runtime exactly; every failure is its typed error."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgefleet.edge_agent.inference import LocalServing
from edgefleet.sdk import (
    AgentUnavailable,
    AsyncClient,
    BudgetUnmet,
    Client,
    CloudUnreachable,
    InvalidInput,
    ModelUnknown,
    SdkError,
)
from edgefleet.sdk.errors import from_reply
from tests.sdk import kit

X = kit.sample(4)


@pytest.fixture
def served(tmp_path):
    with kit.serving(tmp_path) as s:
        yield s


def test_infer_an_array_and_a_dict_equal_bare_onnxruntime(served):
    api, _, telemetry, sock = served
    with Client(sock) as client:
        r = client.infer("digits", X, deadline_ms=25)
        assert list(r.outputs) == ["probabilities"] and np.array_equal(r.outputs["probabilities"], kit.reference(X))
        p = r.provenance
        assert (p.where, p.reason, p.model_version, p.variant, p.escalated, p.energy_source) == (
            "local", "local", 1, "x86-cpu-fp32", False, "estimated")
        assert p.latency_ms > 0 and p.energy_mj == pytest.approx(4.0 * p.latency_ms, rel=1e-3)
        r2 = client.infer("digits", {"input": X[:1]}, outputs=["probabilities"])
        assert np.array_equal(r2.outputs["probabilities"], kit.reference(X[:1]))
        r2.outputs["probabilities"][0, 0] = 1.0  # the app owns its arrays
    [(_, _, _, requests, errors, rows, *_)] = telemetry.totals()
    assert (requests, errors, rows) == (2, 0, 5)


def test_the_socket_is_found_from_env_and_api_json(served, tmp_path, monkeypatch):
    *_, sock = served
    monkeypatch.delenv("EDGEFLEET_AGENT_SOCKET", raising=False)
    monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(tmp_path))  # where the agent wrote api.json
    assert Client().socket_path == str(sock)
    assert np.array_equal(Client().infer("digits", X).outputs["probabilities"], kit.reference(X))
    monkeypatch.setenv("EDGEFLEET_AGENT_SOCKET", str(sock))
    monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(tmp_path / "nowhere"))
    assert Client().socket_path == str(sock)
    assert Client(data_dir=tmp_path / "nowhere", socket="/x.sock").socket_path == "/x.sock"


def test_typed_errors_for_unknown_model_and_bad_input(served):
    *_, sock = served
    with Client(sock) as client:
        with pytest.raises(ModelUnknown, match="'ghost' is not on this device"):
            client.infer("ghost", X)
        with pytest.raises(ModelUnknown, match="version 3"):
            client.infer("digits", X, version="3")
        with pytest.raises(InvalidInput, match=r"datatype FP64, but the model takes input FP32 \[-1, 64\]"):
            client.infer("digits", X.astype(np.float64))
        with pytest.raises(InvalidInput, match=r"shape \[4, 8\] does not fit"):
            client.infer("digits", X[:, :8])
        with pytest.raises(InvalidInput, match="unknown input 'pixels'"):
            client.infer("digits", {"pixels": X})
        with pytest.raises(InvalidInput, match="tier must be one of"):
            client.infer("digits", X, tier="asap")
        with pytest.raises(InvalidInput, match="protocol cannot carry"):
            client.infer("digits", np.array(["a"]))
        with pytest.raises(InvalidInput, match="unknown output 'logits'"):
            client.infer("digits", X, outputs=["logits"])
        # after all that, the same thread's connection still serves
        assert np.array_equal(client.infer("digits", X).outputs["probabilities"], kit.reference(X))


def test_no_agent_is_agent_unavailable(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEFLEET_AGENT_SOCKET", raising=False)
    with pytest.raises(AgentUnavailable, match="is edgefleet-agent running"):
        Client(tmp_path / "absent.sock").infer("digits", X)
    with pytest.raises(AgentUnavailable, match="api.json does not exist"):
        Client(data_dir=tmp_path).infer("digits", X)
    (tmp_path / "api.json").write_text(json.dumps({"unix_socket": None, "url": "http://127.0.0.1:1"}))
    with pytest.raises(AgentUnavailable, match="set api.unix_socket"):
        Client(data_dir=tmp_path).infer("digits", X)


def test_agent_gone_mid_session_is_agent_unavailable(tmp_path):
    with kit.serving(tmp_path) as (api, *_):
        client = Client(api.unix_socket)
        client.infer("digits", X)
    with pytest.raises(AgentUnavailable):
        client.infer("digits", X)  # the socket file is gone: reconnecting fails with the hint


def test_reply_codes_map_to_the_typed_errors():
    cases = [((404, "model_not_found"), ModelUnknown), ((503, "cloud_unavailable"), CloudUnreachable),
             ((504, "budget_unmet"), BudgetUnmet), ((400, "inference"), InvalidInput),
             ((413, "bad_frame"), InvalidInput), ((503, "model_not_ready"), AgentUnavailable),
             ((500, "runtime_load"), AgentUnavailable)]
    for (status, reason), cls in cases:
        err = from_reply(status, reason, "why")
        assert type(err) is cls and isinstance(err, SdkError) and (err.status, err.reason) == (status, reason)


def test_threads_each_keep_a_connection(served):
    *_, sock = served
    client = Client(sock)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        x = kit.sample(3, seed=seed)
        try:
            for _ in range(20):
                assert np.array_equal(client.infer("digits", x).outputs["probabilities"], kit.reference(x))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(client._conns) == 4
    client.close()
    assert client._conns == set()


def test_a_connection_the_agent_closed_while_idle_is_replaced(tmp_path):
    with kit.serving(tmp_path, read_timeout_s=0.3) as (api, _, telemetry, sock):
        client = Client(sock)
        client.infer("digits", X)
        conn = client._local.conn
        assert conn.rfile.read(1) == b""  # wait (bounded by the agent's read timeout) until the agent closed it
        assert np.array_equal(client.infer("digits", X).outputs["probabilities"], kit.reference(X))
        assert client._local.conn is not conn
        [(_, _, _, requests, *_)] = telemetry.totals()
        assert requests == 2  # the retried request ran once


def test_async_client_concurrent_calls(served):
    *_, sock = served

    async def main() -> None:
        async with AsyncClient(sock, max_connections=3) as client:
            xs = [kit.sample(2, seed=s) for s in range(8)]
            results = await asyncio.gather(*(client.infer("digits", x, deadline_ms=50) for x in xs))
            for x, r in zip(xs, results):
                assert np.array_equal(r.outputs["probabilities"], kit.reference(x))
                assert r.provenance.where == "local"
            assert len(client._idle) <= 3
            with pytest.raises(ModelUnknown):
                await client.infer("ghost", X)
            with pytest.raises(InvalidInput, match="datatype INT64"):
                await client.infer("digits", X.astype(np.int64))
            assert np.array_equal((await client.infer("digits", X)).outputs["probabilities"], kit.reference(X))

    asyncio.run(main())


def test_async_client_without_an_agent(tmp_path):
    async def main() -> None:
        with pytest.raises(AgentUnavailable, match="cannot connect"):
            await AsyncClient(tmp_path / "absent.sock").infer("digits", X)

    asyncio.run(main())


def test_async_client_survives_an_idle_close(tmp_path):
    with kit.serving(tmp_path, read_timeout_s=0.3) as (api, _, telemetry, sock):
        async def main() -> None:
            client = AsyncClient(sock)
            await client.infer("digits", X)
            reader, _ = client._idle[0]
            assert await reader.read(1) == b""  # bounded by the agent's read timeout
            assert np.array_equal((await client.infer("digits", X)).outputs["probabilities"], kit.reference(X))
            await client.close()

        asyncio.run(main())
        [(_, _, _, requests, *_)] = telemetry.totals()
        assert requests == 2


class BudgetRouter:
    """A serving object whose router refuses with a budget error, as a strict router may."""

    def __init__(self, service) -> None:
        self.local = LocalServing(service)

    def infer_arrays(self, name, inputs, *, version=None, outputs=None, deadline_ms=None, tier="realtime"):
        from edgefleet.edge_agent.errors import AgentError

        class DeadlineUnmeetable(AgentError):
            reason = "deadline_unmeetable"

        if deadline_ms is not None and deadline_ms < 1:
            raise DeadlineUnmeetable(f"neither side meets {deadline_ms} ms; raise deadline_ms")
        return self.local.infer_arrays(name, inputs, version=version, outputs=outputs)


def test_a_router_error_maps_to_its_typed_error(tmp_path):
    with kit.serving(tmp_path, router_factory=BudgetRouter) as (api, *_):
        with Client(api.unix_socket) as client:
            with pytest.raises(BudgetUnmet, match="raise deadline_ms") as info:
                client.infer("digits", X, deadline_ms=0.5)
            assert info.value.status == 504
            assert client.infer("digits", X, deadline_ms=5).provenance.where == "local"


def test_the_sdk_imports_nothing_heavy():
    code = ("import sys, edgefleet.sdk\n"
            "from edgefleet.sdk import Client, InvalidInput\n"
            "heavy = {'pydantic', 'httpx', 'onnxruntime', 'fastapi', 'sqlalchemy', 'torch', 'grpc', 'google', "
            "'asyncio'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
