"""A chat template given at launch is parsed there: one that does not parse is a 400 that
launches nothing, rather than a deployment whose replicas fail to load on every node.

Parsed as the engines read it (llama-cpp-python's formatter, transformers, and vLLM and MLX
through transformers): a sandboxed Jinja environment with loop controls and transformers'
`{% generation %}` block. Only the syntax is checked here; a template that raises for some
messages (`raise_exception(...)`) answers those requests with a 400 naming its reason.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidDeployment

__all__ = ["check_chat_template"]


def check_chat_template(text: str) -> None:
    """Raise InvalidDeployment (param chat_template) where `text` is not a Jinja template."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: marks the assistant's tokens for
        training in transformers; a plain block for us."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, Generation])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidDeployment(f"the chat template is not valid Jinja: {exc.message} (line "
                                f"{exc.lineno})", param="chat_template") from None
