"""tova-server's HTTP layer: an OpenAI-compatible API over `tova_engine.AsyncEngine`.

FastAPI and pydantic live here; torch does not (the engine owns every tensor).
"""

from server.app import create_app
from server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
