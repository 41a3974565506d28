"""The server as a Ray Serve application of two replicas, on a local Ray cluster, CPU and a tiny random model.

Six sessions talk in interleaved, concurrent turns. Every expectation is the session's conversation run
alone in this process with StreamingSession (replies, and the next-token logits of its exported file).
The tests of this module run in order on one cluster: affinity and isolation, then one replica killed,
then a scale-down from two replicas to one while turns are running.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import defaultdict
from types import SimpleNamespace

import httpx
import pytest
import torch
from conftest import REPO

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from streaming_llm.runtime.sampling import SamplingConfig  # noqa: E402
from streaming_llm.serving.replicas import (  # noqa: E402
    LiveSessionsPolicy,
    ReplicaConfig,
    application,
    build_app,
    parse_serve_args,
    replica_plan,
    session_bytes,
)
from streaming_llm.serving.shared import SessionFiles  # noqa: E402

KEY = "replica-key"
SYSTEM = "You are a terse assistant."
WINDOW = 64
APP = "streaming-llm-test"
# Each session has its own conversation, so that a token of another session would change its replies.
TOPICS = ["rivers", "violins", "glaciers", "ledgers", "comets", "orchards", "tides", "lanterns", "bridges", "moths"]


def turn_text(session: str, turn: int) -> str:
    return f"About {TOPICS[turn % len(TOPICS)]}, question {turn} of {session}: what comes next?"


class Cluster:
    def __init__(self, tiny_dir, state, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.config = ReplicaConfig(model=str(tiny_dir), state=str(state), device="cpu", dtype="float32",
                                    recent_size=WINDOW, api_key=KEY,
                                    sampling=SamplingConfig())  # greedy: replies compared with a reference  # fmt: skip
        self.history: dict[str, list[tuple[str, int]]] = defaultdict(list)  # session -> [(text, max_tokens)]
        self.replies: dict[str, list[str]] = defaultdict(list)
        self.served: dict[str, list[str]] = defaultdict(list)  # session -> replica of each turn
        self.ended: dict[str, list[float]] = defaultdict(list)  # session -> time.monotonic() each turn ended

    def deploy(self, replicas: int) -> None:
        app = application(self.config, replicas=replicas, ray_actor_options={"num_cpus": 0.5}, drain_timeout=60)
        serve.run(app, name=APP, route_prefix="/")

    def headers(self, session: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}", **({"X-Session-Id": session} if session else {})}

    def replica_of(self, session: str) -> str:
        """Where Ray routes the session, asked without creating anything (a 404 for an unknown session)."""
        r = httpx.get(f"{self.url}/v1/sessions/{session}", headers=self.headers(session), timeout=60)
        return r.headers["x-replica-id"]

    def pick(self, per_replica: int, prefix: str, have: dict[str, list[str]] | None = None) -> list[str]:
        """New session ids until each of the running replicas has ``per_replica`` (counting ``have``)."""
        picked = defaultdict(list, {k: list(v) for k, v in (have or {}).items()})
        new: list[str] = []
        replicas = self.running_replicas()
        for i in range(300):
            name = f"{prefix}{i}"
            replica = self.replica_of(name)
            if len(picked[replica]) < per_replica:
                picked[replica].append(name)
                new.append(name)
            if len(picked) == replicas and all(len(v) >= per_replica for v in picked.values()):
                return new
        raise AssertionError(f"the replicas did not all get sessions: {dict(picked)}")

    def turn(self, session: str, stream: bool = False, max_tokens: int = 8, on_first=None) -> None:
        text = turn_text(session, len(self.history[session]))
        messages = ([{"role": "system", "content": SYSTEM}] if not self.history[session] else []) + [
            {"role": "user", "content": text}
        ]
        body = {"model": "streaming-llm", "messages": messages, "max_tokens": max_tokens, "stream": stream}
        url = f"{self.url}/v1/chat/completions"
        if stream:
            with httpx.stream("POST", url, json=body, headers=self.headers(session), timeout=120) as r:
                assert r.status_code == 200, r.read()
                replica, pieces = r.headers["x-replica-id"], []
                for line in r.iter_lines():
                    if on_first is not None:
                        on_first()
                        on_first = None
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        pieces += [c["delta"].get("content") or "" for c in chunk["choices"]]
                reply = "".join(pieces)
        else:
            r = httpx.post(url, json=body, headers=self.headers(session), timeout=120)
            assert r.status_code == 200, r.text
            replica, reply = r.headers["x-replica-id"], r.json()["choices"][0]["message"]["content"]
        self.history[session].append((text, max_tokens))
        self.replies[session].append(reply)
        self.served[session].append(replica)
        self.ended[session].append(time.monotonic())

    def round(self, sessions: list[str], **kwargs) -> None:
        """One turn of every session, all at once (interleaved on the replicas)."""
        errors: list[BaseException] = []

        def one(session: str) -> None:
            try:
                self.turn(session, **kwargs)
            except BaseException as error:  # re-raised below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=one, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors

    def exported(self, session: str) -> bytes:
        r = httpx.get(f"{self.url}/v1/sessions/{session}/export", headers=self.headers(session), timeout=60)
        assert r.status_code == 200, r.text
        return r.content

    def check_against_uninterrupted_runs(self, tiny_dir, tmp_path, sessions: list[str]) -> None:
        """Each session's replies and next-token logits equal its conversation run alone in this process."""
        from streaming_llm import StreamingSession, load_model

        model, tokenizer = load_model(str(tiny_dir), device="cpu", dtype="float32")
        for session in sessions:
            alone = StreamingSession(model, tokenizer, SYSTEM, recent_size=WINDOW)
            expected = [alone.chat(text, max_new_tokens=n) for text, n in self.history[session]]
            assert self.replies[session] == expected, session
            path = tmp_path / f"{session}.safetensors"
            path.write_bytes(self.exported(session))
            served = StreamingSession.load(path, model, tokenizer)
            assert served.turns == len(expected) and served.cache.seen_tokens == alone.cache.seen_tokens
            # The logits to fp32 rounding: the engine feeds prompts in chunks of its token budget, alone whole.
            torch.testing.assert_close(served.last_logits, alone.last_logits, atol=1e-5, rtol=0, msg=session)

    def replica_states(self) -> dict[str, int]:
        return dict(serve.status().applications[APP].deployments["StreamingReplica"].replica_states)

    def running_replicas(self) -> int:
        return self.replica_states().get("RUNNING", 0)


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cluster = Cluster(tiny_dir, tmp_path_factory.mktemp("shared"), port)
        cluster.deploy(replicas=2)
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def sessions(cluster) -> list[str]:
    """Six session ids, three on each replica.

    The ring of a consistent hash puts six random ids on one replica of two with probability 1/32, so
    the ids are picked by asking where Ray routes each (a GET of a session that does not exist yet).
    """
    return cluster.pick(3, prefix="s")


def test_sessions_stick_to_one_replica_spread_over_both_and_never_mix(cluster, sessions, tiny_dir, tmp_path):
    for turn in range(3):
        cluster.round(sessions, stream=turn == 1)
    for session in sessions:
        assert len(set(cluster.served[session])) == 1, cluster.served[session]  # one replica per session
        assert cluster.served[session][0] == cluster.replica_of(session)
    assert len({cluster.served[s][0] for s in sessions}) == 2  # both replicas hold sessions
    cluster.check_against_uninterrupted_runs(tiny_dir, tmp_path, sessions)


def test_a_killed_replica_loses_nothing(cluster, sessions, tiny_dir, tmp_path):
    victim = cluster.served[sessions[0]][-1]
    moved = [s for s in sessions if cluster.served[s][-1] == victim]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for _ in range(2):
        cluster.round(sessions)
    for session in sessions:
        assert victim not in cluster.served[session][-2:]
    assert moved and all(cluster.served[s][-1] != victim for s in moved)
    cluster.check_against_uninterrupted_runs(tiny_dir, tmp_path, sessions)


def test_scale_down_drains_running_turns_and_strands_no_session(cluster, sessions, tiny_dir, tmp_path):
    deadline = time.monotonic() + 120
    while cluster.running_replicas() < 2:  # Serve replaces the killed replica
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    cluster.round(sessions)  # some sessions may now live on the new replica
    where = defaultdict(list)
    for s in sessions:
        where[cluster.served[s][-1]].append(s)
    sessions = sessions + cluster.pick(2, prefix="late", have=where)  # at least two on each replica
    cluster.round(sessions)
    before = {s: cluster.served[s][-1] for s in sessions}
    assert len(set(before.values())) == 2
    started = threading.Barrier(len(sessions) + 1, timeout=120)
    downsized: list[float] = []

    def downsize() -> None:
        started.wait()  # every session's long streamed turn is under way
        downsized.append(time.monotonic())
        cluster.deploy(replicas=1)

    stopping: list[float] = []

    def watch() -> None:  # when Serve starts removing a replica
        while downsizing.is_alive() and not stopping:
            if cluster.replica_states().get("STOPPING"):
                stopping.append(time.monotonic())
            time.sleep(0.05)

    downsizing = threading.Thread(target=downsize)
    watcher = threading.Thread(target=watch)
    downsizing.start()
    watcher.start()
    cluster.round(sessions, stream=True, max_tokens=256, on_first=started.wait)  # running while a replica goes
    downsizing.join(180)
    watcher.join(10)
    assert cluster.running_replicas() == 1
    cluster.round(sessions)
    survivor = {cluster.served[s][-1] for s in sessions}
    assert len(survivor) == 1  # all on the survivor now
    drained = [s for s in sessions if before[s] not in survivor]
    assert drained and all(cluster.served[s][-2] == before[s] for s in drained)  # its turns ran there to the end
    last = max(cluster.ended[s][-2] for s in drained)
    assert stopping and last > stopping[0] > downsized[0], (downsized, stopping, last)  # ran while it was removed
    cluster.check_against_uninterrupted_runs(tiny_dir, tmp_path, sessions)


def test_autoscaling_adds_a_replica_for_live_sessions(cluster):
    """Scaling back down when sessions go idle is the policy's arithmetic (below) plus the drain tested above."""
    fast = {"upscale_delay_s": 0, "look_back_period_s": 11}  # just over the 10 s metrics interval
    app = application(cluster.config, replicas=1, max_replicas=2, target_sessions=2,
                      ray_actor_options={"num_cpus": 0.25}, autoscaling=fast)  # fmt: skip
    serve.run(app, name="autoscaled", route_prefix="/autoscaled")

    def running() -> int:
        states = serve.status().applications["autoscaled"].deployments["StreamingReplica"].replica_states
        return states.get("RUNNING", 0)

    try:
        assert running() == 1
        for i in range(5):  # 5 live sessions at a target of 2 each: the policy asks for 3, capped at 2
            body = {"model": "streaming-llm", "messages": [{"role": "user", "content": f"Hello {i}."}], "max_tokens": 2}
            r = httpx.post(f"{cluster.url}/autoscaled/v1/chat/completions", json=body, timeout=60,
                           headers=cluster.headers(f"auto-{i}"))  # fmt: skip
            assert r.status_code == 200, r.text
        files = SessionFiles(cluster.config.state)
        assert all(files.stamp(f"auto-{i}") for i in range(5))  # shared under a route prefix too
        deadline = time.monotonic() + 120
        while running() < 2:
            assert time.monotonic() < deadline, "no second replica after 120 s"
            time.sleep(0.5)
    finally:
        serve.delete("autoscaled")


# -- without a cluster ---------------------------------------------------------------------------------------
def test_live_sessions_policy_asks_for_enough_replicas():
    policy = LiveSessionsPolicy(target_sessions=4)
    context = SimpleNamespace(aggregated_metrics={"live_sessions": {"r1": 6.0, "r2": 5.0}})
    assert policy(context) == (3, {})  # 11 live sessions at 4 each
    assert policy(SimpleNamespace(aggregated_metrics={"live_sessions": {"r1": 0.0, "r2": 0.0}}))[0] == 1  # idle
    assert policy(SimpleNamespace(aggregated_metrics=None))[0] == 1


def test_session_bytes_is_the_cache_a_session_allocates(model, tokenizer):
    from transformers import LlamaConfig

    from streaming_llm import StreamingSession
    from streaming_llm.eval.shapes import LLAMA3_8B

    plain = StreamingSession(model, tokenizer, None, recent_size=WINDOW)
    plain.chat("Hello there.", max_new_tokens=2)
    assert session_bytes(model.config, 4, WINDOW, torch.float32) == plain.cache.nbytes > 0
    pinned = StreamingSession(model, tokenizer, SYSTEM, recent_size=WINDOW)  # the system prompt is pinned whole
    pinned.chat("Hello there.", max_new_tokens=2)
    assert pinned.cache.start_size > 4
    assert session_bytes(model.config, pinned.cache.start_size, WINDOW, torch.float32) == pinned.cache.nbytes
    # Llama-3-8B, cache 4 + 2044: 4 sinks + a ring of 2,045 + the scratch slot = 2,050 slots of K and V, plus the
    # 4 sinks' canonical keys
    layers, kv_heads, head_dim, bf16 = 32, 8, 128, 2
    expected = layers * kv_heads * head_dim * bf16 * (2 * (4 + 2044 + 2) + 4)
    assert session_bytes(LlamaConfig(**LLAMA3_8B), 4, 2044, "bfloat16") == expected


def test_application_options():
    config = ReplicaConfig(model=None, state="/tmp/x", max_sessions=8)
    fixed = application(config, replicas=2)
    assert fixed._bound_deployment._deployment_config.num_replicas == 2
    scaled = application(config, replicas=1, max_replicas=4, target_sessions=3)._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.policy.policy_kwargs == {"target_sessions": 3}
    router = scaled._deployment_config.request_router_config
    assert router.request_router_class.endswith("ConsistentHashRouter")
    assert router.request_router_kwargs == {"num_fallback_replicas": 0}  # strict affinity
    with pytest.raises(ValueError):
        application(config, replicas=0)
    flags = {
        "model": "/models/m",
        "replicas": "3",
        "state-dir": "s3://bucket/p",
        "device": "cuda:1",
        "max_sessions": "100",
    }
    assert build_app(flags)._bound_deployment._deployment_config.num_replicas == 3  # as a KubeRay RayService would
    planned, resources = replica_plan(parse_serve_args(flags), "s3://bucket/p")
    assert (planned.model, planned.state, planned.device, planned.max_sessions) == ("/models/m", "s3://bucket/p",
                                                                                   "cuda", 100)  # fmt: skip
    assert resources == {"num_cpus": 1.0, "num_gpus": 1}
    with pytest.raises(ValueError, match="state-dir is required"):
        build_app({"replicas": "2"})
