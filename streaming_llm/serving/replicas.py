"""Many replicas of the server on Ray Serve (``streaming-llm serve --replicas N``).

Needs the optional dependencies ``ray[serve]`` and ``fsspec`` (``pip install 'streaming-llm[ray]'``).

Each replica is the single-process server (:func:`~streaming_llm.serving.server.create_app`) over its
own copy of the model, deployed with Ray Serve and wrapped in :class:`~streaming_llm.serving.shared.SessionSync`:

- **Affinity.** Ray Serve's proxy reads the ``X-Session-Id`` header into the request's session id, and
  Ray's consistent-hash request router (``ConsistentHashRouter``, with no fallback) sends every request
  of a session to the same replica. Nothing here routes or proxies. A request without the header (a new
  anonymous chat, or one naming its session in the body's ``user``) goes to any replica; the reply's
  ``X-Session-Id`` names its session, and a client that sends it from then on sticks to one replica.
- **Durability.** Every completed turn is written to the shared state location (a folder, or an fsspec
  URL such as ``s3://bucket/prefix``) before its reply ends. When a replica dies, is drained or scaled
  away, the ring changes and a session's next request lands on another replica, which imports the
  session's last completed turn and continues exactly. A replica whose copy of a session is older than
  the shared file (the session went elsewhere and came back) imports it again.
- **Autoscaling** (``--max-replicas`` above ``--replicas``) follows the live sessions per replica (those
  with a request in the last 5 minutes), reported by each replica, with Ray Serve's autoscaler and a
  custom policy (:class:`LiveSessionsPolicy`). Each replica keeps at most ``--max-sessions`` in memory,
  which on a GPU is capped by what fits beside the weights (:func:`session_bytes`).
- **Drain.** A replica being removed gets no new requests; Ray Serve waits for its running requests
  (at most ``--drain-timeout`` seconds), each of which saves its turn before it completes. A turn cut
  off by the timeout was not saved and its session continues from its last completed turn elsewhere,
  so no session is stranded.

:func:`build_app` is the import path for ``serve run`` / ``serve deploy`` / a KubeRay ``RayService``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from ..runtime.sampling import SamplingConfig
from .config import Limits

if TYPE_CHECKING:
    import torch
    from ray.serve import Application
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)
APP_NAME = "streaming-llm"
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
LIVE = "live_sessions"  # the autoscaling metric each replica reports
IDLE_AFTER = 300.0  # seconds after its last request that a session stops counting as live
GPU_HEADROOM = 0.9  # share of a GPU's free memory (after the weights) that session caches may take


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica needs to build its server (plain data: it travels to the replicas)."""

    model: str | None
    state: str  # the shared state location: a folder or an fsspec URL
    device: str | None = None
    dtype: str | None = None
    start_size: int = 4
    recent_size: int = 2000
    name: str = "streaming-llm"
    max_sessions: int = 8
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    limits: Limits = Limits()
    rows: int = 8
    pinned_capacity: int = 256
    sampling: SamplingConfig | None = None
    aliases: tuple[str, ...] = ()
    memory: str | None = None
    shutdown_timeout: float = 5.0
    idle_after: float = IDLE_AFTER  # seconds after its last turn that a session stops counting as live

    @classmethod
    def from_args(cls, args: argparse.Namespace, state: str) -> ReplicaConfig:
        """The config of the ``serve`` flags, with ``state`` as the shared location."""
        from ..cli.common import sampling_config

        hosts = {"127.0.0.1", "localhost", "::1", args.host, *(h.strip() for h in args.allowed_hosts.split(","))}
        limits = Limits(max_tokens=args.max_tokens_cap, max_body_bytes=args.max_body_bytes,
                        max_messages=args.max_messages, max_prompt_tokens=args.max_prompt_tokens,
                        max_queue=args.max_queue, request_timeout=args.request_timeout)  # fmt: skip
        return cls(
            model=args.model, state=state, device=args.device, dtype=args.dtype, start_size=args.start_size,
            recent_size=args.recent_size, name=args.name, max_sessions=args.max_sessions, api_key=args.api_key,
            allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
            allowed_hosts=tuple(sorted(h for h in hosts if h)), limits=limits, rows=args.rows,
            pinned_capacity=args.pinned_capacity, sampling=sampling_config(args), aliases=tuple(args.model_alias),
            memory=args.memory, shutdown_timeout=args.shutdown_timeout,
        )  # fmt: skip


# -- the replica ---------------------------------------------------------------------------------------------
@serve.deployment
@serve.ingress()
class StreamingReplica:
    """One replica: the server over its own model copy, in step with the shared sessions.

    Every response carries ``X-Replica-Id``, this replica's Ray actor name (for ``ray.kill``, logs).
    """

    def __init__(self, config: ReplicaConfig):
        import ray

        from ..runtime.loading import load_model
        from .server import create_app

        model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
        self.name = ray.get_runtime_context().get_actor_name() or "replica"
        per_session = session_bytes(model.config, config.start_size, config.recent_size, model.dtype,
                                    config.pinned_capacity)  # fmt: skip
        rows = fitting_sessions(config.rows, per_session, model.device)
        app = create_app(
            model, tokenizer, name=config.name, start_size=config.start_size, recent_size=config.recent_size,
            max_sessions=max(config.max_sessions, rows), state_dir=None, api_key=config.api_key,
            allowed_origins=config.allowed_origins, allowed_hosts=config.allowed_hosts, limits=config.limits,
            shutdown_timeout=config.shutdown_timeout, rows=rows, pinned_capacity=config.pinned_capacity,
            sampling=config.sampling, aliases=config.aliases, memory=config.memory,
        )  # fmt: skip
        self.sync, self.asgi = replica_app(app, config, self.name)
        log.warning("%s ready: %d rows on the device (%s each), %d sessions in memory at most, shared state at %s",
                    self.name, rows, _size(per_session), max(config.max_sessions, rows), config.state)  # fmt: skip

    def __serve_build_asgi_app__(self):
        return self.asgi

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metric: the live sessions on this replica."""
        return {LIVE: float(self.sync.live_sessions())}

    def __del__(self):
        # Ray Serve calls this after draining: no request is running, every completed turn is shared.
        log.warning("%s drained: %d live sessions continue on the other replicas", getattr(self, "name", "replica"),
                    self.sync.live_sessions() if hasattr(self, "sync") else 0)  # fmt: skip


def replica_app(app, config: ReplicaConfig, name: str | None):
    """A replica's ASGI app around the server's ``app``: ``(sync, asgi)``.

    ``asgi`` is the Guard (host, origin, API key, CORS) in front of the SessionSync; the server's own
    Guard behind it sees no ``Origin`` header (already checked), so CORS headers are sent once.
    """
    from .guard import Guard
    from .shared import SessionFiles, SessionSync

    async def without_origin(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"origin"]}
        await app(scope, receive, send)

    sync = SessionSync(without_origin, SessionFiles(config.state), api_key=config.api_key, replica=name,
                       idle_after=config.idle_after, max_body_bytes=config.limits.max_body_bytes)  # fmt: skip
    return sync, Guard(sync, config.api_key, config.allowed_origins, config.allowed_hosts)


class LiveSessionsPolicy:
    """Ray Serve autoscaling policy: enough replicas for ``target_sessions`` live sessions each.

    Ray Serve applies ``min_replicas``/``max_replicas`` and the up/down-scaling delays to the result.
    Self-contained on purpose: Ray ships it to its controller by value.
    """

    def __init__(self, target_sessions: float):
        if target_sessions <= 0:
            raise ValueError(f"target_sessions must be > 0, got {target_sessions}")
        self.target_sessions = target_sessions

    def __call__(self, ctx) -> tuple[int, dict]:
        live = sum((ctx.aggregated_metrics or {}).get("live_sessions", {}).values())
        return max(1, math.ceil(live / self.target_sessions)), {}


def application(config: ReplicaConfig, *, replicas: int = 1, max_replicas: int | None = None,
                target_sessions: float | None = None, ray_actor_options: dict | None = None,
                drain_timeout: float = 60.0, autoscaling: dict | None = None) -> Application:  # fmt: skip
    """The Ray Serve application: ``replicas`` replicas, or autoscaling up to ``max_replicas``.

    Args:
        config: What each replica builds.
        replicas: Replicas to run (the minimum, when autoscaling).
        max_replicas: Autoscale between ``replicas`` and this on live sessions (None or ``replicas``: fixed).
        target_sessions: Live sessions per replica the autoscaler aims at (default: half of ``max_sessions``).
        ray_actor_options: Resources of one replica (default: one CPU).
        drain_timeout: Seconds a replica being removed waits for its running requests.
        autoscaling: Extra :class:`AutoscalingConfig` fields (delays, intervals).
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    options: dict = dict(
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER,
                                                  request_router_kwargs={"num_fallback_replicas": 0}),
        max_ongoing_requests=config.limits.max_queue, graceful_shutdown_timeout_s=drain_timeout,
    )  # fmt: skip
    if max_replicas is not None and max_replicas > replicas:
        target = target_sessions or max(1.0, config.max_sessions / 2)
        policy = AutoscalingPolicy(policy_function=LiveSessionsPolicy, policy_kwargs={"target_sessions": target})
        options["autoscaling_config"] = AutoscalingConfig(min_replicas=replicas, max_replicas=max_replicas,
                                                          initial_replicas=replicas, policy=policy,
                                                          **(autoscaling or {}))  # fmt: skip
    else:
        options["num_replicas"] = replicas
    return StreamingReplica.options(**options).bind(config)


# -- capacity arithmetic ---------------------------------------------------------------------------------------
def session_bytes(config: PretrainedConfig, start_size: int, recent_size: int, dtype: torch.dtype | str,
                  pinned_capacity: int | None = None) -> int:  # fmt: skip
    """Bytes of one row of the engine's cache: the streaming cache for these sizes, allocated on the meta device.

    For a full-attention layer: ``kv_heads x head_dim x dtype bytes x (2 x (pinned + recent + 2) + pinned)``
    (keys and values of every slot and the scratch slot, plus the pinned tokens' canonical keys); sliding
    layers keep their own window.
    """
    import torch

    from ..core.cache import StreamingCache

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    pinned = max(start_size, pinned_capacity or start_size)
    cache = StreamingCache(config, start_size, recent_size, rows=1, pinned_capacity=pinned, dtype=dtype,
                           device="meta")  # fmt: skip
    return cache.row_bytes


def fitting_sessions(wanted: int, per_session: int, device: torch.device) -> int:
    """``wanted``, capped on a GPU by the sessions that fit in ``GPU_HEADROOM`` of its free memory."""
    import torch

    if device.type != "cuda":
        return wanted
    free, _ = torch.cuda.mem_get_info(device)
    fit = max(1, int(free * GPU_HEADROOM) // per_session)
    if fit < wanted:
        log.warning("--max-sessions %d does not fit on %s: %d sessions of %s fit in %s free; using %d", wanted,
                    device, fit, _size(per_session), _size(free), fit)  # fmt: skip
    return min(wanted, fit)


def capacity_report(config: PretrainedConfig, start_size: int, recent_size: int, dtype: str, max_sessions: int,
                    replicas: int, max_replicas: int, target_sessions: float | None) -> str:  # fmt: skip
    """The start-up lines: memory per session and per replica, and the autoscaling bounds."""
    import torch

    from ..core.architectures import describe

    spec = describe(config)
    per = session_bytes(config, start_size, recent_size, dtype)
    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    lines = [
        f"Per session: {_size(per)} of cache ({spec.num_layers} layers x {spec.num_kv_heads} KV heads x "
        f"{spec.head_dim} dims x {width} bytes ({dtype}) x keys and values of {start_size}+{recent_size}+1 slots, "
        f"plus {start_size} sink keys; a longer system prompt is pinned whole and adds its tokens).",
        f"Per replica: up to {max_sessions} sessions in memory (--max-sessions) = {_size(max_sessions * per)} beside "
        "the weights (a GPU replica lowers it to what fits in its free memory).",
    ]
    if max_replicas > replicas:
        target = target_sessions or max(1.0, max_sessions / 2)
        lines.append(f"Autoscaling: {replicas} to {max_replicas} replicas, aiming at {target:g} live sessions each "
                     f"(up to {max_replicas * max_sessions} sessions in memory).")  # fmt: skip
    else:
        lines.append(f"Replicas: {replicas} (up to {replicas * max_sessions} sessions in memory in all).")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} bytes"


# -- entry points ---------------------------------------------------------------------------------------------
def build_app(args: dict[str, str]) -> Application:
    """Application builder for ``serve run`` / ``serve deploy`` / KubeRay: ``args`` are ``serve`` flags.

    Example: ``serve run streaming_llm.serving.replicas:build_app model=/models/m replicas=2 state-dir=s3://b/p``.
    A shared ``state-dir`` is required.
    """
    parsed = parse_serve_args(args)
    if not parsed.state_dir:
        raise ValueError("state-dir is required: a folder every node sees, or an fsspec URL (s3://bucket/prefix)")
    return _application(parsed, parsed.state_dir)


def _gpus(args: argparse.Namespace) -> float:
    if args.replica_gpus is not None:
        return args.replica_gpus
    return 1 if (args.device or "").startswith("cuda") else 0


def parse_serve_args(args: dict[str, str]) -> argparse.Namespace:
    """``{"max-replicas": "4", "state_dir": "s3://b/p"}`` parsed as the ``serve`` flags they name."""
    from ..cli import build_parser

    argv = ["serve"]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return build_parser().parse_args(argv)


def replica_plan(args: argparse.Namespace, state: str) -> tuple[ReplicaConfig, dict]:
    """What each replica builds, and the resources Ray reserves for it, from the ``serve`` flags."""
    gpus = _gpus(args)
    resources = {"num_cpus": args.replica_cpus, **({"num_gpus": gpus} if gpus else {})}
    config = ReplicaConfig.from_args(args, state)
    if gpus and config.device and config.device.startswith("cuda:"):
        config = replace(config, device="cuda")  # Ray gives each replica its own GPU(s), numbered from 0
    return config, resources


def _application(args: argparse.Namespace, state: str) -> Application:
    config, resources = replica_plan(args, state)
    return application(config, replicas=args.replicas, max_replicas=args.max_replicas,
                       target_sessions=args.target_sessions, ray_actor_options=resources,
                       drain_timeout=args.drain_timeout)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``streaming-llm serve --replicas N``: start (or join) a Ray cluster, deploy, serve until SIGINT/SIGTERM."""
    import ray
    from transformers import AutoConfig

    from ..runtime.loading import resolve

    joined = args.ray_address is not None
    header = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id")
    if header.lower().replace("_", "-") != "x-session-id":
        log.warning("RAY_SERVE_SESSION_ID_HEADER_KEY=%s: Ray routes sessions by that header, not X-Session-Id, so "
                    "sessions will not stick to a replica (they stay correct, and slower)", header)  # fmt: skip
    state = args.state_dir
    if state is None:
        if joined:
            raise SystemExit("error: --state-dir is required with --ray-address: a folder every node sees, or an "
                             "fsspec URL such as s3://bucket/prefix")  # fmt: skip
        state = tempfile.mkdtemp(prefix="streaming-llm-sessions-")
        print(f"Sessions are shared through {state} (pass --state-dir to keep them across runs).", flush=True)
    if not joined:  # one machine: convert a GGUF model once here, not in every replica at the same time
        args.model = str(resolve(args.model))
    dtype = args.dtype or ("bfloat16" if _gpus(args) else "float32")
    try:
        model_config = AutoConfig.from_pretrained(args.model, local_files_only=True)
        report = capacity_report(model_config, args.start_size, args.recent_size, dtype, args.max_sessions,
                                 args.replicas, args.max_replicas or args.replicas, args.target_sessions)  # fmt: skip
        print(report, flush=True)
    except (OSError, ValueError) as error:  # the model lives on the cluster's nodes only
        print(f"(capacity not computed here: {error})", flush=True)
    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(_application(args, state), name=APP_NAME, route_prefix="/")
        print(f"Serving {args.replicas} replicas on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
        _wait_for_signal()
    finally:
        print("Stopping: the replicas finish their running turns (at most --drain-timeout)...", flush=True)
        if joined:
            serve.delete(APP_NAME)  # drains the replicas; the cluster and its Serve stay
        else:
            serve.shutdown()
        print("Replicas stopped; every completed turn is in", state, flush=True)
        ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
