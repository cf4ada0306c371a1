"""tova-server's front end: an OpenAI-compatible API over `tova_engine.AsyncEngine`.

    app.py       the app factory; cli.py `tova-serve`; settings.py its settings
    routes/      the endpoints, each a few calls into the layers below
    serving/     OpenAI requests -> engine work, engine outputs -> OpenAI responses
    protocol/    the wire format: pydantic models of requests and responses
    http/        HTTP plumbing: errors, middleware, limits, shutdown, server-sent events
    metrics/     Prometheus

FastAPI and pydantic live here; torch does not (the engine owns every tensor).
"""

from server.app import create_app
from server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
