"""Options defined once: a config field carries its default, help and command-line spelling.

A stage's frozen config dataclass is the one definition of its options. Each field is written
with ``option(default, help, ...)``: the default and the comment a user reads in ``--help`` sit
together, the dataclass's ``__post_init__`` validates, and ``parse`` (when given) turns the
command line's text (``"a,b"``, ``"1-10"``) into the field's value. ``seqpatch.cli._options``
builds each ``seqpatch build <stage>`` command from these fields; ``config_from`` builds the
config from keyword options for the ``seqpatch.pipeline.build_*`` functions.

``RuntimeSettings`` holds how a build runs (shard size, engine path, executor, device,
progress): none of it changes the rows, so none of it enters the version; provenance records it
under ``runtime``. Nothing here imports a heavy library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from seqpatch.errors import SeqpatchError

OPTION = "seqpatch_option"
"""The ``dataclasses.field`` metadata key holding an ``Opt``."""
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()
"""``Opt.cli_default`` when the CLI shows the field's own default."""


class OptionsError(SeqpatchError):
    """An option's value (or name) is wrong; the message names it and what it accepts."""


@dataclass(frozen=True)
class Opt:
    """How one config field appears on the command line.

    ``parse`` reads the CLI's text into the field's value (the CLI then takes a string);
    ``flag`` defaults to ``--field-name``; ``min``/``max`` are checked while parsing;
    ``show_default`` is ``False`` where the help says what the default means.
    """

    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    cli_default: Any = UNSET
    min: float | None = None
    max: float | None = None
    show_default: bool = True
    cli: bool = True


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    cli_default: Any = UNSET,
    min: float | None = None,
    max: float | None = None,
    show_default: bool = True,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a command-line option (see ``Opt``).

    ``cli_default`` is the text the CLI shows and parses when it differs from ``default`` (e.g.
    ``"1-10"`` for the tuple ``(1, …, 10)``).
    """
    meta = Opt(help, flag, parse, cli_default, min, max, show_default, cli)
    return dataclasses.field(default=default, metadata={OPTION: meta})


def options_of(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Opt]]:
    """``{field name: (field, Opt)}`` of a config class, in declaration order."""
    return {
        f.name: (f, f.metadata[OPTION]) for f in dataclasses.fields(cls) if OPTION in f.metadata
    }


def flag_of(name: str, opt: Opt) -> str:
    return opt.flag or "--" + name.replace("_", "-")


def config_from(cls: type, cfg: Any = None, **given: Any) -> Any:
    """``cls(**given)``, or ``cfg`` with ``given`` replaced; an unknown name is one line.

    ``None`` values are left out (the field's default applies), so a caller may pass every
    option it received without restating defaults.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise OptionsError(
            f"{cls.__name__} has no option {unknown[0]!r}; its options: {', '.join(sorted(names))}"
        )
    values = {k: v for k, v in given.items() if v is not None}
    return cls(**values) if cfg is None else dataclasses.replace(cfg, **values)


def split_options(cls: type, given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword options split into ``cls``'s fields and ``RuntimeSettings``' fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    runtime_names = {f.name for f in dataclasses.fields(RuntimeSettings)}
    unknown = sorted(set(given) - names - runtime_names)
    if unknown:
        raise OptionsError(
            f"{cls.__name__} has no option {unknown[0]!r}; its options: "
            f"{', '.join(sorted(names))}; execution settings: {', '.join(sorted(runtime_names))}"
        )
    cfg = {k: v for k, v in given.items() if k in names}
    runtime = {k: v for k, v in given.items() if k in runtime_names}
    return cfg, runtime


# ---------------------------------------------------------------------------------------------
# Shared checks and parsers for the command line's text

MAX_SEED = 2**63 - 1  # numpy and torch seeds are 64-bit
SEED_HELP = "Seed of every random choice (0..2**63-1)."


def check_seed(value: Any) -> None:
    """A seed is an integer in ``0..MAX_SEED``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise OptionsError(f"--seed: seed must be an integer in 0..2**63-1, got {value!r}")


def csv(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def int_list(flag: str, example: str = "1,2,4") -> Callable[[str], tuple[int, ...]]:
    """A parser of ``"1,2,4"`` for ``flag``; a non-integer is one line naming the flag."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in csv(text))
        except ValueError:
            raise OptionsError(
                f"cannot read {flag} {text!r}; give integers like {example}"
            ) from None

    return parse


def layer_list(text: str | None) -> tuple[int, ...]:
    """``--layers 0,2,3`` -> ``(0, 2, 3)``; empty or absent means every layer (``()``).

    A repeated index is refused: it would store (or sweep) the same layer twice.
    """
    if not text:
        return ()
    try:
        indices = tuple(int(part) for part in csv(text))
    except ValueError:
        raise OptionsError(f"cannot read --layers {text!r}; give indices like 0,1,2") from None
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise OptionsError(
            f"--layers {text!r} repeats layer {', '.join(map(str, repeated))}; give each layer once"
        )
    return indices


def choice(flag: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser accepting one of ``choices`` for ``flag``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise OptionsError(f"unknown {flag} {text!r}; use one of {', '.join(choices)}")
        return text

    return parse


# ---------------------------------------------------------------------------------------------
# Execution settings: how a build runs, never what it computes

ENGINES = ("auto", "cached", "full")
EXECUTORS = ("local", "ray")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class RuntimeSettings:
    """How a build runs. None of these changes a row beyond float rounding, so none enters
    the version (on an accelerator the model's dtype may change too: see the README).

    ``shard_size=None`` takes the stage's own (``SHARD_SIZE`` of a sharded stage module); the
    engine path is how exact patching or tracing is computed (every path gives the same
    numbers to rounding, checked by the engine's tests), not which estimate is stored
    (``--method attribution`` is part of the patching config). torch's CPU threads are set by
    the root's ``--threads`` (``SEQPATCH_THREADS``) and recorded as ``torch_threads``.
    """

    shard_size: int | None = option(
        None,
        "Pairs (tracing: programs) per resumable shard.",
        min=1,
        show_default=False,  # the stage's SHARD_SIZE, shown by each command
    )
    engine: str = option(
        "auto",
        "Engine path of exact patching and tracing: auto (the compute-floor path where the "
        "architecture allows), cached (restart from the patched layer) or full (whole "
        "forwards). Same version; rows agree to float rounding.",
        parse=choice("--engine", ENGINES),
    )
    executor: str = option(
        "local",
        "Where the shards are computed: local (this process) or ray (Ray actors, one per "
        "GPU or CPU slot; needs `pip install 'seqpatch[ray]'`). Same version either way.",
        parse=choice("--executor", EXECUTORS),
    )
    ray_address: str | None = option(
        None,
        "With --executor ray: a running cluster's address (e.g. ray://head:10001) "
        "[default: a local Ray instance]. The data dir must be shared by every node.",
        show_default=False,
    )
    device: str = option(
        "auto",
        "Where the model runs: auto (cuda if available, else mps, else cpu), cpu, cuda or mps.",
        parse=choice("--device", DEVICES),
    )
    progress: bool = option(True, "Show progress bars.", cli=False)

    def __post_init__(self) -> None:
        if self.shard_size is not None and (
            not isinstance(self.shard_size, int) or self.shard_size < 1
        ):
            raise OptionsError(f"shard_size must be >= 1, got {self.shard_size!r}")
        for name, allowed in (
            ("engine", ENGINES),
            ("executor", EXECUTORS),
            ("device", DEVICES),
        ):
            value = getattr(self, name)
            if name == "executor" and not isinstance(value, str):
                continue  # a configured executor object (a RayExecutor), for tests and notebooks
            if value not in allowed:
                raise OptionsError(f"unknown --{name} {value!r}; use one of {', '.join(allowed)}")

    def shard_size_for(self, default: int | None) -> int | None:
        """The shard size to cut: this one, else the stage's ``default``."""
        return default if self.shard_size is None or default is None else self.shard_size

    def resolved_device(self) -> str:
        """``auto`` → cuda if available, else mps, else cpu (probed only when asked)."""
        if self.device != "auto":
            return self.device
        import torch

        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"

    def record(self, shard_size: int | None = None) -> dict[str, Any]:
        """What provenance stores under ``runtime``: the settings as run (``shard_size``: the
        size the stage was cut to), the device resolved."""
        import torch

        executor = self.executor if isinstance(self.executor, str) else type(self.executor).__name__
        return {
            "shard_size": shard_size,
            "engine": self.engine,
            "executor": executor,
            "device": self.resolved_device(),
            "torch_threads": torch.get_num_threads(),
            "device_count": torch.cuda.device_count(),
        }
