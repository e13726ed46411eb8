"""Command-line options generated from a pydantic settings model: one `--field-name` per field, its help text the
field's description plus the environment variable that sets it. A flag left out is not passed, so the
environment (UNDERSTUDY_*) and then the model's default apply: flags > environment > defaults, as the model says.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

# Flags kept from before the options were generated (scripts and docs use them).
ALIASES: dict[str, tuple[str, ...]] = {
    "follow_alias": ("--follow",),
    "num_speculative_tokens": ("-k",),
    "request_timeout_s": ("--request-timeout",),
    "vllm_startup_timeout_s": ("--vllm-startup-timeout",),
    "cors_origins": ("--cors-origin",),
}


def _flag_type(annotation: Any) -> tuple[Any, str]:
    """The type typer parses for a field, and a hint of its allowed values for the help text."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(inner[0])
    if origin is Literal:
        choices = typing.get_args(annotation)
        return str, " | ".join(map(str, choices))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return list[item], ""  # type: ignore[valid-type]
    return annotation, ""


def settings_parameters(model: type[BaseModel], env_prefix: str) -> list[inspect.Parameter]:
    params = []
    for name, field in model.model_fields.items():
        typ, choices = _flag_type(field.annotation)
        help_text = field.description or name.replace("_", " ")
        if choices and choices not in help_text:
            help_text += f" ({choices})"
        help_text += f" \\[env: {env_prefix}{name.upper()}]"  # Rich markup (typer's help) ate "[env: ...]"
        flag = "--" + name.replace("_", "-")
        decls = (f"{flag}/--no-{flag[2:]}",) if typ is bool else (flag,)
        option = typer.Option(*decls, *ALIASES.get(name, ()), help=help_text, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[typ | None, option]))
    return params


def settings_command(model: type[BaseModel], env_prefix: str, extra: Callable[..., Any],
                     run: Callable[[dict[str, Any], dict[str, Any]], None]) -> Callable[..., None]:
    """A function typer can register: the settings' options followed by `extra`'s own parameters. It calls
    run(settings_overrides, extra_kwargs) with only the flags that were given."""
    extra_params = list(inspect.signature(extra).parameters.values())
    fields = set(model.model_fields)
    clash = fields & {p.name for p in extra_params}
    if clash:
        raise ValueError(f"extra options {sorted(clash)} collide with settings fields")
    hints = typing.get_type_hints(extra, include_extras=True)
    extra_params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                    for p in extra_params]
    params = settings_parameters(model, env_prefix) + extra_params

    def command(**kwargs: Any) -> None:
        overrides = {k: v for k, v in kwargs.items() if k in fields and v is not None and v != []}
        run(overrides, {k: v for k, v in kwargs.items() if k not in fields})

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = extra.__doc__
    command.__name__ = extra.__name__
    return command
