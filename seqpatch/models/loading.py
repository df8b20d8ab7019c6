"""Load a model once: ``load_model(spec)``, ``load_tokenizer``, and ``identify(spec)`` without weights.

``spec`` is ``"builtin"`` (the shipped organism), a local folder, or a Hub id; nothing is
downloaded for the first two, and a Hub id that cannot be fetched fails at once with one error
saying what to do (one request without retries when the id is not in the local cache, none under
``HF_HUB_OFFLINE``). ``remote=True`` prepares a run on NDIF instead of loading weights here.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seqpatch.models import pretrained
from seqpatch.models.adapters import adapter_for
from seqpatch.models.errors import ModelLoadError
from seqpatch.models.handle import ModelHandle
from seqpatch.models.specs import BUILTIN, classify
from seqpatch.progress import library_bars
from seqpatch.prompts import (
    CodeFormat,
    CompactFormat,
    PromptFormat,
    bind_tokenizer,
    get_prompt_format,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

ORGANISM_ID = "seqpatch/organism"  # model_id of the built-in organism


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """``None``: float32 on CPU (bf16 matmuls are slow there), the checkpoint's dtype elsewhere."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16 or float16")
    return resolved


def _is_wordlevel(tokenizer_json: Path) -> bool:
    try:
        return json.loads(tokenizer_json.read_text())["model"]["type"] == "WordLevel"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_tokenizer(
    source: str | Path,
    revision: str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool = False,
) -> Any:
    """The tokenizer of a folder or Hub id, keeping word-level tokenizers word-level.

    ``AutoTokenizer`` forces the architecture's tokenizer class (e.g. ``Qwen2Tokenizer``),
    which silently turns a word-level ``tokenizer.json`` into byte-level pieces; such files
    are loaded with ``PreTrainedTokenizerFast`` instead.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import cached_file

    tokenizer_json = cached_file(
        str(source),
        "tokenizer.json",
        revision=revision,
        local_files_only=local_files_only,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if tokenizer_json is not None and _is_wordlevel(Path(tokenizer_json)):
        return PreTrainedTokenizerFast.from_pretrained(
            str(source), revision=revision, local_files_only=local_files_only
        )
    return AutoTokenizer.from_pretrained(
        str(source),
        revision=revision,
        trust_remote_code=trust_remote_code,
        local_files_only=local_files_only,
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _folder_revision(folder: Path) -> str:
    """A local checkpoint's content id: its configs, tokenizer and every byte of its weights.

    Each weight file's SHA-256 is memoized by file state in the seqpatch cache
    (``seqpatch.hashing``), so a large folder is read once, not at every command, and a weight
    changed in place (even at the same size) gives a new revision. A folder converted by
    ``seqpatch models install`` reports its GGUF's SHA-256 instead.
    """
    from seqpatch.hashing import content_hash

    converted = pretrained.folder_revision(folder)
    if converted is not None:
        return converted
    digest = hashlib.sha256()
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{path.name}:{content_hash(path)}".encode())
    return "sha256:" + digest.hexdigest()[:16]


def _hub_error(spec: str, error: Exception | None, remote: bool = False) -> ModelLoadError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        hint = "the repo is gated: accept its license on the Hub and log in with `hf auth login`"
    elif isinstance(error, RepositoryNotFoundError):
        hint = "no such repo (or it is private: log in with `hf auth login`); check the id"
    elif isinstance(error, RevisionNotFoundError):
        hint = "the repo has no such revision; check the branch, tag or commit"
    elif isinstance(error, EntryNotFoundError):
        hint = "the repo has no config.json, so it is not a transformers model"
    elif remote and constants.HF_HUB_OFFLINE:
        hint = (
            "HF_HUB_OFFLINE is set and the model's config is not in the local cache, while "
            "remote=True (--remote) needs the network anyway (the Hub for the config and "
            "tokenizer, NDIF for the run): unset HF_HUB_OFFLINE"
        )
    elif remote:
        hint = (
            "the Hub could not be reached, and remote=True (--remote) needs the network (the "
            "Hub for the config and tokenizer, NDIF for the run): check the network, or drop "
            f"remote=True and run a downloaded copy here (`hf download {spec}`, then pass the "
            "folder)"
        )
    elif constants.HF_HUB_OFFLINE:
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local cache: unset it, or "
            f"download on a machine with network (`hf download {spec}`) and pass the folder"
        )
    else:
        hint = (
            "the Hub could not be reached and the model is not in the local cache: check the "
            f"network, or download it elsewhere (`hf download {spec}`) and pass the folder path"
        )
    if "/" not in spec:
        hint += (
            f"; {spec!r} is neither a local folder, {BUILTIN!r} nor a pretrained name "
            "(`seqpatch models list`), and Hub ids look like 'org/name': check the spelling"
        )
    detail = f" ({error})" if error is not None else ""
    return ModelLoadError(f"could not load {spec!r} from the Hugging Face Hub: {hint}.{detail}")


def _probe_hub(spec: str, revision: str | None) -> Any:
    """One request for the repo's ``config.json``, without retries; its ``HfFileMetadata``.

    ``huggingface_hub`` retries an unreachable Hub with backoff for half a minute or more when
    a file is not in the local cache; this probe fails at once instead. Returns ``None`` under
    ``HF_HUB_OFFLINE`` (nothing is requested then, and a cached config may still serve).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return None
    url = hf_hub_url(spec, "config.json", revision=revision)
    return get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)  # no retries


def _hub_answered(error: Exception) -> bool:
    """Whether the Hub itself answered ``error`` (no such repo, gated, …), as opposed to the
    network or the server failing, when a cached copy may still serve."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if isinstance(error, EntryNotFoundError):
        return True
    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    return response is not None and response.status_code < 500


def _hub_commit(spec: str, revision: str | None) -> tuple[str | None, bool]:
    """The commit ``revision`` of Hub repo ``spec`` resolves to, and whether to load from the
    local cache only (the Hub is unreachable or ``HF_HUB_OFFLINE`` is set).

    Asks the Hub once, without retries; when it cannot be reached, the local cache answers, as
    it does for ``transformers`` (``snapshots/<commit>/config.json``). Raises ``ModelLoadError``
    at once when the Hub refuses the id, or is unreachable and nothing is cached.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import httpx  # the HTTP library huggingface_hub uses
    from transformers.utils.hub import extract_commit_hash

    failure: Exception | None = None
    try:
        metadata = _probe_hub(spec, revision)
    except (OSError, httpx.HTTPError, EntryNotFoundError) as error:
        if _hub_answered(error):
            raise _hub_error(spec, error) from error
        failure, metadata = error, None
    if metadata is not None:
        return metadata.commit_hash or revision, False
    cached = try_to_load_from_cache(spec, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise _hub_error(spec, failure) from failure
    return extract_commit_hash(cached, None) or revision, True


def _load_config(
    source: str, revision: str | None, trust_remote_code: bool, local_files_only: bool = False
) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source,
            revision=revision,
            trust_remote_code=trust_remote_code,
            local_files_only=local_files_only,
        )
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"{source!r} needs custom code from its repo, which the seqpatch command never "
                "runs; from Python, load_model(..., trust_remote_code=True) runs it: only if you "
                "trust that code"
            ) from error
        raise


def _builtin_dir() -> Path:
    import seqpatch.organism as organism

    weights_dir = getattr(organism, "WEIGHTS_DIR", None)
    if weights_dir is None or not (Path(weights_dir) / "config.json").is_file():
        raise ModelLoadError(
            f"the built-in organism's weights are missing (seqpatch.organism.WEIGHTS_DIR = "
            f"{weights_dir!r}); reinstall seqpatch or train them with `seqpatch organism train`"
        )
    return Path(weights_dir)


def _folder_source(spec: str) -> str:
    """The absolute path of a model folder; ``ModelLoadError`` unless it holds a config.json."""
    source = str(Path(spec).expanduser().resolve())
    if not (Path(source) / "config.json").is_file():
        raise ModelLoadError(
            f"{source} is not a model folder: it has no config.json (expected the output "
            "of save_pretrained or a Hub snapshot)"
        )
    return source


def identify(spec: str, revision: str | None = None) -> dict[str, str | None]:
    """``model_id`` and ``revision`` of ``spec``, as ``load_model(spec).describe()`` reports them.

    No model is built and no weights are read beyond what the loader's own content hash reads:
    ``builtin`` and local folders get that hash (``sha256:…``, or ``revision`` when given for a
    folder); a Hub id gets the commit its revision resolves to (one request without retries,
    else the local cache, which is all that is read under ``HF_HUB_OFFLINE``). This is what lets
    a stored stage version be found without loading its model. Raises ``ModelLoadError`` as
    ``load_model`` would for a missing folder or an unknown, unreachable Hub id.
    """
    kind = classify(spec)
    if kind == "builtin":
        return {"model_id": ORGANISM_ID, "revision": _folder_revision(_builtin_dir())}
    if kind == "pretrained":
        folder = pretrained.resolve(spec)
        return {
            "model_id": pretrained.model_id(spec),
            "revision": revision or _folder_revision(folder),
        }
    if kind == "folder":
        source = _folder_source(spec)
        return {"model_id": source, "revision": revision or _folder_revision(Path(source))}
    return {"model_id": spec, "revision": _hub_commit(spec, revision)[0]}


def load_model(
    spec: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    remote: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    prompt_format: PromptFormat | str | None = None,
) -> ModelHandle:
    """Load ``spec`` (``"builtin"``, a pretrained name, a local folder, or a Hub id).

    A pretrained name (``seqpatch.models.pretrained.REGISTRY``) loads the folder that
    ``seqpatch models install NAME`` converted, under its registry id, revision (the GGUF's
    SHA-256) and default prompt format.

    An existing local path wins over a Hub id of the same name.
    ``device="auto"`` picks CUDA when available. ``dtype=None`` is float32 on CPU and the
    checkpoint's dtype on accelerators. ``remote=True`` prepares an NDIF run: nothing is loaded
    locally (a meta skeleton only), it needs a Hub id, network and an NDIF API key. The prompt
    format defaults to ``CompactFormat`` for the organism and ``CodeFormat`` otherwise; a format
    name (``compact``, ``code``, ``code-chat``) or instance overrides it. Raises
    ``ModelLoadError`` (or ``UnsupportedArchitectureError``) with what failed and what to do.
    """
    kind = classify(spec)
    if remote:
        return _load_remote(spec, kind, revision, trust_remote_code, prompt_format)
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

    dev = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    if kind == "builtin":
        folder = _builtin_dir()
        config = _load_config(str(folder), None, False)
        if config.model_type != "llama":
            raise ModelLoadError(
                f"the built-in organism must be a llama model, not {config.model_type!r}"
            )
        with library_bars(False):
            hf_model = LlamaForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        model_id, rev = ORGANISM_ID, _folder_revision(folder)
    else:
        if kind == "pretrained":
            source = str(pretrained.resolve(spec))
            prompt_format = prompt_format or pretrained.get_entry(spec).default_format()
        else:
            source = _folder_source(spec) if kind == "folder" else spec
        # A Hub id is resolved to a commit first, failing at once rather than after the Hub's
        # retries; everything is then loaded at that commit (the revision that is recorded).
        cache_only = False
        if kind == "hub":
            commit, cache_only = _hub_commit(spec, revision)
            revision = commit or revision
        try:
            config = _load_config(source, revision, trust_remote_code, cache_only)
            adapter_for(config)  # fail on an unknown architecture before loading weights
            with library_bars(False):  # its "Loading weights" bar: not one of seqpatch's bars
                hf_model = AutoModelForCausalLM.from_pretrained(
                    source,
                    revision=revision,
                    dtype=torch_dtype,
                    trust_remote_code=trust_remote_code,
                    local_files_only=cache_only,
                )
            tokenizer = load_tokenizer(source, revision, trust_remote_code, cache_only)
        except pickle.UnpicklingError as error:  # torch's weights_only refused the pickle: good
            raise ModelLoadError(
                f"the weights in {source} are a pickle holding more than tensors, which torch "
                "refuses to load (it could run code); use a copy saved as model.safetensors"
            ) from error
        except (OSError, HfHubHTTPError) as error:
            if kind != "hub":
                raise ModelLoadError(
                    f"could not load the model folder {source}: {error}"
                ) from error
            raise _hub_error(spec, error) from error
        model_id = pretrained.model_id(spec) if kind == "pretrained" else source
        if kind in ("folder", "pretrained"):
            rev = revision or _folder_revision(Path(source))
        else:
            rev = revision
    hf_model = hf_model.to(dev).eval()
    return _make_handle(spec, model_id, rev, hf_model, tokenizer, kind, prompt_format, remote=False)


def require_ndif_key() -> None:
    """Raise ``ModelLoadError`` unless nnsight has an NDIF API key (``NDIF_API_KEY``)."""
    from nnsight import CONFIG

    if not CONFIG.API.APIKEY:
        raise ModelLoadError(
            "remote=True (--remote) needs an NDIF API key: get one at https://login.ndif.us and "
            "set NDIF_API_KEY, or call nnsight.CONFIG.set_default_api_key(key)"
        )


def _load_remote(
    spec: str,
    kind: str,
    revision: str | None,
    trust_remote_code: bool,
    prompt_format: PromptFormat | str | None,
) -> ModelHandle:
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx  # the HTTP library huggingface_hub uses
    from nnsight.modeling.transformers import TransformersModel

    if kind != "hub":
        raise ModelLoadError(
            f"remote=True (--remote) runs models that NDIF serves, named by Hub id; {spec!r} is "
            "a local model: drop remote=True to run it here"
        )
    require_ndif_key()
    try:
        metadata = _probe_hub(spec, revision)
        revision = getattr(metadata, "commit_hash", None) or revision
        model = TransformersModel(
            spec, task="text-generation", revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, HfHubHTTPError, httpx.HTTPError) as error:
        raise _hub_error(spec, error, remote=True) from error
    hf_model = model._module
    return _make_handle(
        spec, spec, revision, hf_model, model.tokenizer, kind, prompt_format, True, model
    )


def _make_handle(
    spec: str,
    model_id: str,
    revision: str | None,
    hf_model: PreTrainedModel,
    tokenizer: Any,
    kind: str,
    prompt_format: PromptFormat | str | None,
    remote: bool,
    model: Any = None,
) -> ModelHandle:
    adapter = adapter_for(hf_model.config)
    if model is None:
        from nnsight.modeling.transformers import TransformersModel

        model = TransformersModel(hf_model, task="text-generation", tokenizer=tokenizer)
    tokenizer = model.tokenizer  # nnsight pads left, and with EOS when there is no pad token
    tokenizer.padding_side = "left"
    fmt = _choose_format(prompt_format, kind, tokenizer)
    config = hf_model.config
    param = next(hf_model.parameters())
    return ModelHandle(
        spec=spec,
        model_id=model_id,
        revision=revision,
        model=model,
        hf_model=hf_model,
        tokenizer=tokenizer,
        adapter=adapter,
        prompt_format=fmt,
        n_layers=adapter.n_layers(config),
        n_heads=adapter.n_heads(config),
        d_model=adapter.d_model(config),
        d_head=adapter.d_head(config),
        n_params=sum(p.numel() for p in hf_model.parameters()),
        device=param.device,
        dtype=param.dtype,
        remote=remote,
    )


def _choose_format(fmt: PromptFormat | str | None, kind: str, tokenizer: Any) -> PromptFormat:
    if fmt is None:
        fmt = CompactFormat() if kind == "builtin" else CodeFormat()
    elif isinstance(fmt, str):
        fmt = get_prompt_format(fmt)
    if getattr(fmt, "tokenizer", True) is None:  # chat wrapping needs the model's template
        fmt = bind_tokenizer(fmt, tokenizer)
    return fmt
