"""What `moerun serve` runs: load the model and serve it with uvicorn, or as Ray Serve replicas."""

from __future__ import annotations

import logging
from pathlib import Path

from ..runtime.errors import MoerunError

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(model_dir: Path, host: str, port: int, settings, provider: str, threads: int | None, ray: bool,
          replicas: int, on_ready=None) -> None:
    """Blocks serving MODEL_DIR until interrupted; ``on_ready(message)`` is told where it listens."""
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MoerunError(f"moerun serve needs the serve extra ({e.name} is missing): "
                          "pip install 'moerun[serve]'") from None
    if replicas != 1 and not ray:
        raise MoerunError("--replicas needs --ray (one process serves one replica)")
    if ray:
        from ..runtime import Manifest
        from .ray_app import run_ray

        Manifest.load(model_dir)  # a wrong directory fails here, in one line, not in every replica

        if on_ready:
            on_ready(f"Ray Serve: {replicas} replicas of {model_dir} on http://{host}:{port}")
        run_ray(model_dir, settings, host, port, replicas, provider, threads)
        return
    from ..runtime import MoEModel
    from .app import create_app

    model = MoEModel.load(model_dir, provider=provider, threads=threads)
    app = create_app(model, settings)
    server = app.state.server
    if on_ready:
        on_ready(f"{model.manifest.architecture} on {model.execution_provider}, {server.batching} batching "
                 f"(max batch {1 if server.scheduler is None else server.scheduler.max_batch}), "
                 f"http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning")
