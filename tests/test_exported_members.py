"""Each package's public face is its __init__ with __all__; pin it."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["meshnode.engines", "meshnode.node", "meshnode.http",
                                  ])
def test_all_names_exist_and_are_sorted_unique(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    for member in exported:
        assert hasattr(module, member), member


def test_engines_package_imports_no_engine_library() -> None:
    import subprocess
    import sys
    code = ("import sys, meshnode.http, meshnode.node, meshnode.engines; "
            "print([m for m in ('llama_cpp', 'torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
