"""meshnode: a peer-to-peer model-serving mesh with an OpenAI-compatible API."""

__version__ = "0.1.0"
__all__ = ["__version__"]
