"""Ray Serve scale-out: the same FastAPI app (create_app) as a Ray Serve deployment, each replica loading its own
ONNX Runtime session, behind Ray's HTTP proxy. Needs the `ray` extra (ray[serve])."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..runtime.errors import MoerunError
from .app import ServeSettings

__all__ = ["build_application", "run_ray"]

log = logging.getLogger(__name__)


def build_application(model_dir: Path, settings: ServeSettings, provider: str = "auto", threads: int | None = None,
                      replicas: int = 1):
    """A bound Ray Serve application: ``replicas`` copies of the server, each with its own model and scheduler."""
    from ray import serve

    # num_cpus 0: Ray does not hold cores for a replica (ONNX Runtime's own threads, --threads, share them)
    @serve.deployment(name="moerun", num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=settings.max_batch + settings.max_queue)
    @serve.ingress()
    class MoerunReplica:
        def __init__(self, model_dir: str, settings: ServeSettings, provider: str, threads: int | None) -> None:
            from ..runtime import MoEModel

            self.model = MoEModel.load(model_dir, provider=provider, threads=threads)
            self.settings = settings

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.model, self.settings)

    settings.model_name = settings.model_name or Path(model_dir).name
    return MoerunReplica.bind(str(Path(model_dir).resolve()), settings, provider, threads)


def run_ray(model_dir: Path, settings: ServeSettings, host: str, port: int, replicas: int, provider: str = "auto",
            threads: int | None = None, blocking: bool = True, node_ip: str = "127.0.0.1") -> None:
    """Starts a local Ray head on ``node_ip`` (loopback by default: anyone reaching Ray's ports can run code), or
    joins the cluster at RAY_ADDRESS, then Ray Serve's proxy on host:port, then the application; blocks until
    interrupted when ``blocking``."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MoerunError("--ray needs Ray Serve: pip install 'moerun[ray]'") from None
    address = os.environ.get("RAY_ADDRESS")
    local = {} if address else {"_node_ip_address": node_ip}
    ray.init(address=address or None, include_dashboard=False, ignore_reinit_error=True,
             logging_level=logging.WARNING, **local)
    serve.start(http_options={"host": host, "port": port})
    app = build_application(model_dir, settings, provider, threads, replicas)
    serve.run(app, name="moerun", route_prefix="/", blocking=blocking)
