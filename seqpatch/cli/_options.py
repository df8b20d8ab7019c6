"""Typer parameters derived from config dataclasses (``seqpatch.options``).

``option_parameters(cls)`` turns each ``option(...)`` field into an ``inspect.Parameter``
annotated ``Annotated[type, typer.Option(...)]``; ``command(...)`` gives a function that
signature, so typer builds ``--flag``s, defaults and help from the field alone, and hands the
parsed values back as the config (and the ``RuntimeSettings``) it builds.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from seqpatch.options import UNSET, Opt, RuntimeSettings, flag_of, options_of

_KW = inspect.Parameter.KEYWORD_ONLY


def _escape(text: str) -> str:
    return text.replace("[", "\\[")


def _cli_type(field: dataclasses.Field[Any], opt: Opt) -> Any:
    if opt.parse is not None:
        optional = field.default is None and opt.cli_default is UNSET
        return str | None if optional else str
    hint = field.type
    if isinstance(hint, str):
        hint = eval(hint, {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple})
    return hint


def _default(field: dataclasses.Field[Any], opt: Opt) -> Any:
    if opt.cli_default is not UNSET:
        return opt.cli_default
    if opt.parse is not None and isinstance(field.default, tuple):
        return ",".join(map(str, field.default))
    return field.default


def option_parameters(
    cls: type, only: Sequence[str] | None = None, defaults: dict[str, Any] | None = None
) -> list[inspect.Parameter]:
    """One typer parameter per CLI option field of ``cls`` (``only``: these, in this order)."""
    fields = options_of(cls)
    names = [n for n in (only if only is not None else fields) if fields[n][1].cli]
    params = []
    for name in names:
        field, opt = fields[name]
        given = defaults is not None and name in defaults
        default = defaults[name] if given else _default(field, opt)  # type: ignore[index]
        info = typer.Option(
            flag_of(name, opt),
            help=_escape(opt.help),
            min=opt.min,
            max=opt.max,
            show_default=opt.show_default or given,
        )
        params.append(
            inspect.Parameter(
                name, _KW, default=default, annotation=Annotated[_cli_type(field, opt), info]
            )
        )
    return params


def values_to(cls: type, values: dict[str, Any]) -> Any:
    """The ``cls`` instance for the CLI values of its option fields (parsers applied)."""
    return cls(**option_values(cls, values))


def option_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The CLI values of ``cls``'s option fields, parsed, popped from ``values`` (an option left
    out whose field has a default other than ``None`` is omitted: the field's default applies)."""
    fields = options_of(cls)
    kwargs = {}
    for name, (field, opt) in fields.items():
        if name not in values:
            continue
        value = values.pop(name)
        if opt.parse is not None and isinstance(value, str):
            value = opt.parse(value)
        if value is None and field.default is not None:
            continue  # an option left out: the field's default
        kwargs[name] = value
    return kwargs


def command(
    app: typer.Typer,
    name: str,
    config: type | None,
    run: Callable[..., None],
    *,
    doc: str,
    epilog: str,
    extra: Sequence[inspect.Parameter] = (),
    runtime: Sequence[str] = (),
    runtime_defaults: dict[str, Any] | None = None,
    raw: bool = False,
) -> None:
    """Register ``name`` on ``app``: options of ``config``, then ``extra``, then the named
    ``RuntimeSettings`` fields. ``run(cfg, runtime, **extra values)`` does the work; with
    ``raw`` it gets the config's option values as a dict instead (for a pipeline function that
    resolves some options itself before it makes the config)."""
    params = [
        *(option_parameters(config) if config is not None else []),
        *extra,
        *option_parameters(RuntimeSettings, runtime, runtime_defaults),
    ]

    def invoke(**values: Any) -> None:
        if config is None:
            cfg = None
        else:
            cfg = option_values(config, values) if raw else values_to(config, values)
        settings = values_to(RuntimeSettings, {k: values.pop(k) for k in runtime})
        run(cfg, settings, **values)

    invoke.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    invoke.__doc__ = doc
    invoke.__name__ = name.replace("-", "_")
    app.command(name, epilog=epilog)(invoke)


def param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """An extra keyword parameter (an ``Annotated`` typer option alias and its default)."""
    return inspect.Parameter(name, _KW, default=default, annotation=annotation)
