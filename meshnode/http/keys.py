"""Typed keys under which the aiohttp application holds its state."""

from aiohttp import web

from meshnode.node import Node

__all__ = ["NODE"]

NODE = web.AppKey("node", Node)
