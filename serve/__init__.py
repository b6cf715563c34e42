"""`moerun serve`: an OpenAI-compatible HTTP server with continuous batching (FastAPI, uvicorn, prometheus-client,
jinja2: the `serve` extra). Imports the runtime only, never torch."""

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # imported on use: the web libraries are an optional extra
        from .app import create_app

        return create_app
    raise AttributeError(name)
