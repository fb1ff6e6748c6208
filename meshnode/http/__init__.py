"""HTTP: the public OpenAI API and the admin API (aiohttp)."""

from .app import build_app, serve
from .errors import error_response

__all__ = ["build_app", "error_response", "serve"]
