"""What `moerun serve` runs: bind the address, load the model and serve it with uvicorn, or as Ray Serve replicas."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from ..runtime.errors import MoerunError

__all__ = ["bind", "make_server", "serve"]

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not (a port in use, a host that does not resolve)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise MoerunError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MoerunError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def make_server(app, host: str = "127.0.0.1", port: int = 0):
    """A uvicorn server for create_app's ``app`` whose shutdown first answers every running and new request 503
    (uvicorn otherwise waits for running requests, however long, before the app hears of the shutdown)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.server.close()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))


def serve(model_dir: Path, host: str, port: int, settings, provider: str, threads: int | None, ray: bool,
          replicas: int, on_ready=None, ray_node_ip: str = "127.0.0.1") -> None:
    """Blocks serving MODEL_DIR until interrupted; ``on_ready(message)`` is told where it listens, once it does."""
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MoerunError(f"moerun serve needs the serve extra ({e.name} is missing): "
                          "pip install 'moerun[serve]'") from None
    if replicas != 1 and not ray:
        raise MoerunError("--replicas needs --ray (one process serves one replica)")
    if ray:
        from ..runtime import Manifest
        from .ray_app import run_ray

        Manifest.load(model_dir)  # a wrong directory fails here, in one line, not in every replica
        bind(host, port).close()  # Ray's proxy binds it later: a port in use fails here, in one line
        if on_ready:
            on_ready(f"Ray Serve: {replicas} replicas of {model_dir} on http://{host}:{port}")
        run_ray(model_dir, settings, host, port, replicas, provider, threads, node_ip=ray_node_ip)
        return
    from ..runtime import MoEModel
    from .app import create_app

    sock = bind(host, port)
    try:
        model = MoEModel.load(model_dir, provider=provider, threads=threads)
        app = create_app(model, settings)
        serving = app.state.server
        if on_ready:
            on_ready(f"{model.manifest.architecture} on {model.execution_provider}, batching: {serving.batching} "
                     f"(max batch {serving.max_batch}), http://{host}:{sock.getsockname()[1]}/v1")
        make_server(app, host, port).run(sockets=[sock])
    finally:
        sock.close()
