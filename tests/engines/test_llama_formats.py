"""The llama.cpp adapter's schema checks, without a model: which keywords its grammar cannot
enforce (refused when strict), and schemas the converter cannot read (a 400 naming the param).
The real grammar on real weights is tested in tests/e2e/test_response_format.py."""

import importlib.util

import pytest

from meshnode.engines import InvalidRequest
from meshnode.engines.llama import _schema_grammar, _unenforced


def test_unenforced_keywords_are_found_with_their_path() -> None:
    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "pick": {"anyOf": [{"type": "number", "multipleOf": 2}, {"type": "null"}]},
            "name": {"type": "string", "maxLength": 10, "pattern": "^[a-z]+$"},
        },
        "$defs": {"x": {"type": "number", "exclusiveMaximum": 3}},
    }
    assert sorted(_unenforced(schema, "$")) == sorted([
        "minimum at $.age", "uniqueItems at $.tags", "multipleOf at $.pick.anyOf[0]",
        "exclusiveMaximum at $.$defs.x"])
    # Property names that happen to be keywords are names, not keywords.
    assert _unenforced({"type": "object", "properties": {"minimum": {"type": "string"}}},
                       "$") == []
    assert _unenforced(None, "$") == [] and _unenforced({"enum": [1, 2]}, "$") == []


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="needs pip install '.[llama]'")
def test_unreadable_schema_is_an_invalid_request() -> None:
    assert "root ::=" in _schema_grammar('{"type": "object", "properties": '
                                         '{"a": {"type": "string"}}}')
    with pytest.raises(InvalidRequest) as caught:
        _schema_grammar('{"type": "object", "properties": {"a": {"type": "nosuchtype"}}}')
    assert caught.value.param == "response_format.json_schema.schema"
    assert "not a JSON schema" in str(caught.value)
