"""When API keys are required (auth.keys_required); the 401/403 rules run on real processes in
tests/cluster/test_api_keys.py."""

from __future__ import annotations

import pytest

from meshnode.http.auth import keys_required
from meshnode.node import NodeConfig


@pytest.mark.parametrize(("fields", "required"), [
    ({}, False),                                               # open loopback node: as before
    ({"host": "localhost"}, False),
    ({"host": "::1"}, False),
    ({"host": "0.0.0.0"}, True),                               # bound off loopback
    ({"host": "192.168.1.20"}, True),
    ({"host": "0.0.0.0", "insecure": True}, False),            # explicitly open
    ({"ca_cert": "ca.pem", "cert": "c.pem"}, True),            # a cluster identity
    ({"ca_cert": "ca.pem", "cert": "c.pem", "insecure": True}, True),
    ({"api_keys": "required"}, True),
    ({"api_keys": "off", "ca_cert": "ca.pem"}, False),
])
def test_keys_required(fields: dict[str, object], required: bool) -> None:
    assert keys_required(NodeConfig(**fields)) is required  # type: ignore[arg-type]
