"""`meshnode launch --chat-template FILE` through the real command: a file it cannot use is
an error naming the file, before any request (the endpoint here answers nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NOWHERE = "http://127.0.0.1:9"  # discard port: a request sent there would fail differently


@pytest.mark.parametrize(("content", "why"), [
    (None, "No such file or directory"),
    (b"\xff\xfe\x00bad", "not UTF-8 text"),
    (b"  \n", "is empty"),
])
def test_an_unusable_template_file_is_refused_by_name(tmp_path: Path, content: bytes | None,
                                                      why: str) -> None:
    path = tmp_path / "template.jinja"
    if content is not None:
        path.write_bytes(content)
    run = subprocess.run([sys.executable, "-m", "meshnode", "launch", "gemma-3-270m",
                          "--chat-template", str(path), "--endpoint", NOWHERE],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1, run
    assert run.stderr.startswith("meshnode: ") and str(path) in run.stderr, run.stderr
    assert why in run.stderr and "Traceback" not in run.stderr, run.stderr
