"""What an import checks before anything is registered: the files stay inside the published
folder, and the rows are the rows the published config says they are.

A published folder is someone else's files. Its ``README.md`` decides which parquet files
``load_dataset`` reads, and its ``seqpatch.json`` decides the version and the parents the
local store records, so both are checked as untrusted input:

- every ``data_files``/``data_dir`` path of the stage's card config is relative, has no ``..``
  and no URL scheme, and lies in the stage's folder (``<stage>/...``);
- every file the import reads (card, provenance, parquet, the stage folder itself) resolves
  inside the folder: a symlink that leaves it is refused;
- parent stages and versions are plain names (``../../../x`` could name any folder);
- the rows have the stage's schema, and agree with the config: its family and lengths, the
  count per length, and for ``programs`` each program regenerated from its seed.

Every problem is one ``HubError`` line naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from datasets import Dataset

from seqpatch.cards import CardError, existing_card_data
from seqpatch.hub.token import HubError

FIX = "re-export or re-push the stage with seqpatch"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STAGE = re.compile(r"^[a-z][a-z0-9_-]*$")


# ---------------------------------------------------------------------------------------------
# Files stay inside the folder


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies in ``folder``."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_inside(folder: Path, paths: list[Path]) -> None:
    """Refuse any of ``paths`` that leaves ``folder`` (through a symlink) or is not a file."""
    for path in paths:
        if not inside(path, folder):
            raise HubError(
                f"{path} leads outside {folder} (a symlink to {path.resolve()}); an import reads "
                "only files inside the published folder. Replace the link by the file itself."
            )


def _path_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key != "split":
                yield from _path_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _path_strings(item)


def check_data_files(readme: str, where: str, stage: str) -> list[str]:
    """The stage's ``data_files`` patterns from a card, each checked to stay in ``<stage>/``."""
    try:
        data = existing_card_data(readme)
    except CardError as err:
        raise HubError(f"{where}: {err}; {FIX}") from None
    configs = data.get("configs")
    entry = next(
        (c for c in configs or [] if isinstance(c, Mapping) and c.get("config_name") == stage),
        None,
    )
    if entry is None:
        raise HubError(f"{where} lists no config {stage!r}; {FIX}")
    patterns = [*_path_strings(entry.get("data_files")), *_path_strings(entry.get("data_dir"))]
    if not patterns:
        raise HubError(f"{where}: config {stage!r} names no data_files; {FIX}")
    for pattern in patterns:
        pure = PurePosixPath(pattern.replace("\\", "/"))
        if (
            "://" in pattern
            or pattern.startswith(("hf:", "/", "~"))
            or re.match(r"^[A-Za-z]:", pattern)
            or ".." in pure.parts
            or pure.parts[:1] != (stage,)
        ):
            raise HubError(
                f"{where}: config {stage!r} reads {pattern!r}, outside the stage's folder "
                f"{stage}/; an import reads only {stage}/{pure.name if pure.parts else '...'} "
                f"files of the published copy. {FIX[0].upper()}{FIX[1:]}."
            )
    return patterns


def check_parent_names(provenance: Mapping[str, Any], where: str) -> None:
    """Parent stages and versions (and the stage's own version) are plain names, never paths."""
    records = provenance.get("parents") or []
    if provenance.get("parent") is not None:
        records = [*records, provenance["parent"]]
    for record in records:
        stage = record.get("stage")
        if not _STAGE.match(stage):
            raise HubError(f"{where}: parent stage {stage!r} is not a stage name; {FIX}")
        for key in ("version", "fingerprint"):
            value = record.get(key)
            if value is not None and (not isinstance(value, str) or not NAME.match(value)):
                raise HubError(f"{where}: parent {stage} has {key} {value!r}, not a name; {FIX}")
    own = provenance.get("version")
    if own is not None and (not isinstance(own, str) or not NAME.match(own)):
        raise HubError(f"{where}: version {own!r} is not a name; {FIX}")


# ---------------------------------------------------------------------------------------------
# Rows agree with the config they claim


def _expected_columns(module: Any, config: Any) -> set[str] | None:
    """The stage's column names: its ``FEATURES``, or its ``features(...)`` with dummy sizes."""
    declared = getattr(module, "FEATURES", None)
    if declared is not None:
        return set(declared)
    maker = getattr(module, "features", None)
    if maker is None:
        return None
    import inspect

    params = list(inspect.signature(maker).parameters.values())
    args: list[Any] = []
    for param in params:
        if param.kind is param.VAR_POSITIONAL:
            args += [1, 1, 1]
        elif param.name == "cfg":
            args.append(config)
        else:
            args.append(1)
    try:
        return set(maker(*args))
    except Exception:  # a features() that needs more than sizes: columns are not checked
        return None


def check_rows(dataset: Dataset, provenance: Mapping[str, Any], stage: str, where: str) -> None:
    """The rows are ``stage`` rows and agree with the published config."""
    from seqpatch.stages import get_stage

    module = get_stage(stage)
    config_class = getattr(module, "CONFIG", None)
    config = provenance["config"]
    cfg = config_class(**config) if config_class is not None else None
    expected = _expected_columns(module, cfg)
    columns = set(dataset.column_names)
    if expected is not None and columns != expected:
        missing, extra = sorted(expected - columns), sorted(columns - expected)
        raise HubError(
            f"{where}: the parquet files do not hold {stage} rows (missing columns "
            f"{missing[:4]}, unexpected {extra[:4]}); {FIX}"
        )
    declared = getattr(module, "FEATURES", None)
    if declared is not None and dataset.features != declared:
        raise HubError(
            f"{where}: the parquet files' column types are not the {stage} schema; {FIX}"
        )
    _check_against_config(dataset, config, stage, where)
    if stage == "programs" and cfg is not None:
        _check_programs(dataset, cfg, where)


def _check_against_config(
    dataset: Dataset, config: Mapping[str, Any], stage: str, where: str
) -> None:
    def wrong(what: str) -> HubError:
        return HubError(f"{where}: the rows contradict the config: {what}; {FIX}")

    names = set(dataset.column_names)
    if "family" in config and "family" in names:
        families = set(dataset["family"])
        if families - {config["family"]}:
            raise wrong(f"config family {config['family']!r}, rows of {sorted(families)}")
    if "seq_len" in names:
        lens = Counter(dataset["seq_len"])
        if "seq_len" in config and set(lens) - {config["seq_len"]}:
            raise wrong(f"config seq_len {config['seq_len']}, rows of lengths {sorted(lens)}")
        if "seq_lens" in config and "n_per_len" in config:
            wanted = {int(n): int(config["n_per_len"]) for n in config["seq_lens"]}
            if dict(lens) != wanted:
                found = ", ".join(f"{n}: {c}" for n, c in sorted(lens.items()))
                raise wrong(
                    f"n_per_len {config['n_per_len']} for lengths {sorted(wanted)}, rows per "
                    f"length {{{found}}}"
                )
    if stage == "pairs" and "n_pairs" in config and dataset.num_rows != config["n_pairs"]:
        raise wrong(f"n_pairs {config['n_pairs']}, {dataset.num_rows} rows")


def _check_programs(dataset: Dataset, cfg: Any, where: str) -> None:
    """Each program is the one its (seed, family, length, index) draws: regenerated here."""
    from seqpatch.programs import make_sequence, program_rng

    rows = dataset.select_columns(["seq_len", "index", "seed", "text"])
    for row in rows:
        program = make_sequence(
            cfg.family,
            row["seq_len"],
            program_rng(cfg.seed, cfg.family, row["seq_len"], row["index"]),
        )
        if row["seed"] != cfg.seed or program.to_row()["text"] != row["text"]:
            raise HubError(
                f"{where}: program {row['seq_len']}/{row['index']} is not the one config "
                f"{dataclasses.asdict(cfg)} draws (the rows were changed or come from another "
                f"config); {FIX}"
            )
