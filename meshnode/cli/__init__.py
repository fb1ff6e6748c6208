"""The `meshnode` command."""

from .main import main

__all__ = ["main"]
