"""Load a model once, and name the places ("sites") where its activations are read and patched.

``load_model(spec)`` returns a ``ModelHandle``: the ``transformers`` model (eval mode), the nnsight
wrapper around that same module, its tokenizer, a prompt format, and an ``ArchitectureAdapter``
that knows where each architecture keeps its embeddings, decoder layers, attention, MLP, final
norm and unembedding. ``spec`` is ``"builtin"`` (the shipped organism), a local folder, or a Hub
id; nothing is downloaded for the first two, and a Hub id that cannot be fetched fails fast with
one error saying what to do.

Sites — one meaning everywhere (``docs/architecture.md``), per prompt at layer ``l``:

=============  ==============================================  ====================================
site           tensor                                          read at
=============  ==============================================  ====================================
``resid_pre``  hidden state entering decoder layer ``l``       input of ``layers[l]``
``resid_post`` hidden state leaving decoder layer ``l``        output of ``layers[l]``
``attn_out``   attention module's output, before the residual  ``layers[l].<attn>`` output ``[0]``
``mlp_out``    MLP module's output, before the residual        output of ``layers[l].<mlp>``
``head``       per-head attention output, before ``o_proj``    input of ``<attn_o_proj>``, split
=============  ==============================================  ====================================

``resid_pre`` is read as the *input* of the layer, never as the embedding module's output, so it
is exactly what the layer receives: Gemma's ``sqrt(d_model)`` embedding scale and GPT-2's
position embeddings are included. Hence ``resid_post[l] == resid_pre[l + 1]`` exactly. Shapes are
``[batch, tokens, d_model]``; ``head`` is ``[batch, tokens, n_heads, d_head]`` where ``d_head``
comes from the config (``n_heads * d_head`` may differ from ``d_model``, as in Gemma and Qwen3).

Caveats, per architecture: GPT-NeoX (``use_parallel_residual``) and Phi run attention and MLP in
parallel from the same input; Gemma 2 applies a norm to ``attn_out`` and ``mlp_out`` before they
join the residual and soft-caps its logits (``ModelHandle.logits_from_resid`` does both ends).

Every layer of every supported architecture returns a bare tensor in transformers 5, and every
attention module a tuple whose first element is its output; ``SiteRef`` hides both facts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from seqpatch.errors import SeqpatchError
from seqpatch.prompts import CodeFormat, CompactFormat, PromptFormat, get_prompt_format

if TYPE_CHECKING:
    from transformers import BatchEncoding, PretrainedConfig, PreTrainedModel

    from seqpatch.programs import Program

BUILTIN = "builtin"
Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "head"]
SITES: tuple[Site, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(SeqpatchError, RuntimeError):
    """A model could not be loaded; the message says what failed and what to do."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's ``model_type`` has no ``ArchitectureAdapter``."""


class SiteError(SeqpatchError, ValueError):
    """An unknown site name or a layer index out of range."""


class AnswerTokenizationError(SeqpatchError, ValueError):
    """An answer text cannot be tokenized as a separate suffix of the prompt."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one architecture (dotted, as in ``named_modules``).

    ``embed``, ``layers``, ``final_norm`` and ``unembed`` are relative to the ``*ForCausalLM``
    root; ``attn``, ``mlp`` and ``attn_o_proj`` are relative to one decoder layer.
    """

    model_type: str
    embed: str
    layers: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    attn_o_proj: str
    parallel_residual: bool = False  # attention and MLP read the same layer input

    def n_layers(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    def n_heads(self, config: PretrainedConfig) -> int:
        return int(config.num_attention_heads)

    def d_model(self, config: PretrainedConfig) -> int:
        return int(config.hidden_size)

    def d_head(self, config: PretrainedConfig) -> int:
        head_dim = getattr(config, "head_dim", None)
        return int(head_dim) if head_dim else self.d_model(config) // self.n_heads(config)

    def is_parallel(self, config: PretrainedConfig) -> bool:
        return bool(getattr(config, "use_parallel_residual", self.parallel_residual))


def _llama_like(model_type: str, **overrides: Any) -> ArchitectureAdapter:
    paths = {
        "embed": "model.embed_tokens",
        "layers": "model.layers",
        "final_norm": "model.norm",
        "unembed": "lm_head",
        "attn": "self_attn",
        "mlp": "mlp",
        "attn_o_proj": "self_attn.o_proj",
    }
    return ArchitectureAdapter(model_type, **{**paths, **overrides})


ADAPTERS: dict[str, ArchitectureAdapter] = {
    a.model_type: a
    for a in (
        _llama_like("llama"),
        _llama_like("mistral"),
        _llama_like("qwen2"),
        _llama_like("qwen3"),
        _llama_like("gemma"),
        _llama_like("gemma2"),
        _llama_like("phi3"),
        _llama_like(
            "phi",
            final_norm="model.final_layernorm",
            attn_o_proj="self_attn.dense",
            parallel_residual=True,
        ),
        ArchitectureAdapter(
            "gpt2",
            embed="transformer.wte",
            layers="transformer.h",
            final_norm="transformer.ln_f",
            unembed="lm_head",
            attn="attn",
            mlp="mlp",
            attn_o_proj="attn.c_proj",
        ),
        ArchitectureAdapter(
            "gpt_neox",
            embed="gpt_neox.embed_in",
            layers="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            unembed="lm_head",
            attn="attention",
            mlp="mlp",
            attn_o_proj="attention.dense",
            parallel_residual=True,
        ),
    )
}


def adapter_for(config: PretrainedConfig) -> ArchitectureAdapter:
    """The adapter for ``config.model_type``; ``UnsupportedArchitectureError`` lists the known ones."""
    model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]  # type: ignore[index]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: {known}. "
            "Add an ArchitectureAdapter to seqpatch.models.ADAPTERS for it (module paths of its "
            "embeddings, layers, attention, MLP, o_proj, final norm and unembedding)."
        ) from None


@dataclass(frozen=True, eq=False)
class SiteRef:
    """Where one site of one layer lives: a module, and whether it is that module's input or output.

    ``get``/``put`` convert between the module's raw input/output and the site tensor (first
    element of a tuple output; ``head`` split into ``[..., n_heads, d_head]``); ``hook`` registers
    a plain torch hook that sees, and may replace, the site tensor.
    """

    site: Site
    layer: int
    path: str  # dotted path from the *ForCausalLM root
    module: nn.Module
    kind: Literal["input", "output"]
    n_heads: int | None = None  # set for ``head``: the last dim splits into (n_heads, d_head)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n_heads is None else x.unflatten(-1, (self.n_heads, -1))

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n_heads is None else x.flatten(-2)

    def get(self, value: Any) -> torch.Tensor:
        """The site tensor from the module's first input (``kind="input"``) or its output."""
        if isinstance(value, tuple):
            value = value[0]
        return self._split(value)

    def put(self, value: Any, site_tensor: torch.Tensor) -> Any:
        """``value`` (first input or output) with the site tensor replaced by ``site_tensor``."""
        new = self._merge(site_tensor)
        return (new, *value[1:]) if isinstance(value, tuple) else new

    def hook(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
        """Register ``fn(site_tensor) -> replacement | None`` on the module; returns the handle."""
        if self.kind == "output":

            def output_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
                new = fn(self.get(output))
                return None if new is None else self.put(output, new)

            return self.module.register_forward_hook(output_hook)

        def input_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                new = fn(self.get(args[0]))
                return None if new is None else ((self.put(args[0], new), *args[1:]), kwargs)
            key = next(iter(kwargs))
            new = fn(self.get(kwargs[key]))
            return None if new is None else (args, {**kwargs, key: self.put(kwargs[key], new)})

        return self.module.register_forward_pre_hook(input_hook, with_kwargs=True)

    def read(self, envoy: Any) -> torch.Tensor:
        """Inside an nnsight trace: the site tensor of ``envoy`` (the envoy of ``self.module``)."""
        return self.get(envoy.input if self.kind == "input" else envoy.output)


@dataclass(eq=False)
class ModelHandle:
    """A loaded model with everything the pipeline needs to run and intervene on it.

    ``model`` (nnsight) wraps exactly ``hf_model``; ``remote`` says whether traces must run on
    NDIF (then ``hf_model`` is a meta-device skeleton). ``model_id`` and ``revision`` identify
    the weights for provenance.
    """

    spec: str
    model_id: str
    revision: str | None
    model: Any  # nnsight.modeling.transformers.TransformersModel
    hf_model: PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    adapter: ArchitectureAdapter
    prompt_format: PromptFormat
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    n_params: int
    device: torch.device
    dtype: torch.dtype
    remote: bool = False
    _modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def submodule(self, path: str) -> nn.Module:
        """The module at a dotted path from the ``*ForCausalLM`` root."""
        if path not in self._modules:
            self._modules[path] = self.hf_model.get_submodule(path)
        return self._modules[path]

    def layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` (negative indices count from the end)."""
        return self.submodule(f"{self.adapter.layers}.{self._layer_index(i)}")

    def _layer_index(self, i: int) -> int:
        if not -self.n_layers <= i < self.n_layers:
            raise SiteError(f"layer {i} is out of range for a {self.n_layers}-layer model")
        return i % self.n_layers

    def module(self, site: Site, layer: int) -> SiteRef:
        """Where ``site`` of ``layer`` is read: module, input or output, and the head split."""
        layer = self._layer_index(layer)
        base = f"{self.adapter.layers}.{layer}"
        kind: Literal["input", "output"] = "output"
        n_heads = None
        match site:
            case "resid_pre":
                path, kind = base, "input"
            case "resid_post":
                path = base
            case "attn_out":
                path = f"{base}.{self.adapter.attn}"
            case "mlp_out":
                path = f"{base}.{self.adapter.mlp}"
            case "head":
                path, kind, n_heads = f"{base}.{self.adapter.attn_o_proj}", "input", self.n_heads
            case _:
                raise SiteError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
        return SiteRef(site, layer, path, self.submodule(path), kind, n_heads)

    def envoy(self, site_or_path: str, layer: int | None = None) -> Any:
        """The nnsight envoy of a site's module (``envoy("mlp_out", 3)``) or of a dotted path."""
        path = self.module(site_or_path, layer).path if layer is not None else site_or_path  # type: ignore[arg-type]
        envoy = self.model
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def read(self, site: Site, layer: int) -> torch.Tensor:
        """Inside ``with handle.trace(...)``: the site tensor of ``layer`` (call ``.save()``)."""
        return self.module(site, layer).read(self.envoy(site, layer))

    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """``model.trace`` that runs on NDIF when the handle was loaded with ``remote=True``."""
        kwargs.setdefault("remote", self.remote)
        return self.model.trace(*inputs, **kwargs)

    def logits_from_resid(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding and (Gemma 2) logit soft-capping applied to a residual state."""
        logits = self.submodule(self.adapter.unembed)(
            self.submodule(self.adapter.final_norm)(resid)
        )
        cap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def encode(self, prompts: str | Sequence[str]) -> BatchEncoding:
        """Tokenize prompts as one left-padded batch on the model's device.

        A padded batch carries ``position_ids`` counted from each row's first real token (as
        nnsight adds them), so padding shifts no position and a plain ``hf_model(**batch)``
        sees exactly what a trace sees.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) > 1 and self.tokenizer.pad_token_id is None:
            raise ModelLoadError(
                "this tokenizer has no pad (or EOS) token, so prompts cannot be batched; "
                "set tokenizer.pad_token, or pass one prompt at a time"
            )
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        mask = batch["attention_mask"]
        if not bool(mask.all()):
            batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return batch if self.remote else batch.to(self.device)

    def prompt_ids(self, program: Program) -> list[int]:
        """The token ids the model reads for ``program`` (special tokens included, unpadded).

        This is the ``TokenizeFn`` that ``make_counterfactual_pair`` checks lengths with.
        """
        return list(self.tokenizer(self.prompt_format.prompt(program))["input_ids"])

    def answer_token_ids(self, values: Iterable[int], prompt: str | None = None) -> list[list[int]]:
        """Token ids of each value's answer text as it is tokenized right after ``prompt``.

        ``prompt`` defaults to the format's reference prompt. The answer ids are the suffix of
        ``tokenize(prompt + answer)`` beyond ``tokenize(prompt)``; if the prompt's own ids change
        when the answer is appended (a merge across the boundary) or a piece is unknown to the
        tokenizer, ``AnswerTokenizationError`` says so.
        """
        prompt = self.prompt_format.reference_prompt() if prompt is None else prompt
        prompt_ids = self._ids(prompt)
        unk = self.tokenizer.unk_token_id
        result = []
        for value in values:
            answer = self.prompt_format.answer_text(value)
            full = self._ids(prompt + answer)
            if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
                raise AnswerTokenizationError(
                    f"answer {answer!r} does not tokenize as a suffix of the prompt (ending "
                    f"{prompt[-20:]!r}): the tokenizer merges across the boundary. Change the "
                    "prompt format's cue or answer_text so the answer starts a new token."
                )
            suffix = full[len(prompt_ids) :]
            if unk is not None and unk in suffix:
                raise AnswerTokenizationError(
                    f"answer {answer!r} contains a piece unknown to the tokenizer (unk token "
                    f"{self.tokenizer.unk_token!r}); this model cannot be scored on value {value}"
                )
            result.append(suffix)
        return result

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def max_answer_tokens(self) -> int | None:
        """How many tokens the model itself says to generate (``generation_config.max_new_tokens``).

        The organism says 1: it is trained on the answer token only, so whatever it generates
        after that was never trained and is not part of its answer. ``None`` when unset.
        """
        generation_config = getattr(self.hf_model, "generation_config", None)
        value = getattr(generation_config, "max_new_tokens", None)
        return int(value) if value else None

    def describe(self) -> dict[str, Any]:
        """JSON-able identity and shape of the model, for provenance."""
        return {
            "spec": self.spec,
            "model_id": self.model_id,
            "revision": self.revision,
            "model_type": self.adapter.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_model": self.d_model,
            "d_head": self.d_head,
            "n_params": self.n_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "prompt_format": self.prompt_format.describe(),
        }


# ---------------------------------------------------------------------------- loading


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
    source: str | Path, revision: str | None = None, trust_remote_code: bool = False
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
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if tokenizer_json is not None and _is_wordlevel(Path(tokenizer_json)):
        return PreTrainedTokenizerFast.from_pretrained(str(source), revision=revision)
    return AutoTokenizer.from_pretrained(
        str(source), revision=revision, trust_remote_code=trust_remote_code
    )


def _folder_revision(folder: Path) -> str:
    """A cheap content id of a local checkpoint: configs, tokenizer, and weight file sizes.

    Small checkpoints (< 64 MB of weights, like the organism) hash their weights too.
    """
    digest = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    small = sum(p.stat().st_size for p in weights) < 64 * 2**20
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    for path in weights:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        if small:
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def _hub_error(spec: str, error: Exception, remote: bool = False) -> ModelLoadError:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        hint = "the repo is gated: accept its license on the Hub and log in with `hf auth login`"
    elif isinstance(error, RepositoryNotFoundError):
        hint = "no such repo (or it is private: log in with `hf auth login`); check the id"
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
    return ModelLoadError(f"could not load {spec!r} from the Hugging Face Hub: {hint}. ({error})")


def _probe_hub(spec: str, revision: str | None) -> None:
    """One request for the repo's ``config.json``, without retries; raises when it fails.

    A remote run needs the network anyway, so there is no cache to fall back to: without this
    probe, ``huggingface_hub`` retries an unreachable Hub with backoff for about half a minute
    before ``TransformersModel`` gives up. Skipped under ``HF_HUB_OFFLINE`` (nothing is
    requested then, and a cached config may still serve an NDIF run).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return
    url = hf_hub_url(spec, "config.json", revision=revision)
    get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)  # no retries by default


def _load_config(source: str, revision: str | None, trust_remote_code: bool) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        )
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"{source!r} needs custom code from its repo; pass trust_remote_code=True "
                "(--trust-remote-code) only if you trust that code"
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


def _classify(spec: str) -> Literal["builtin", "folder", "hub"]:
    if spec == BUILTIN:
        return "builtin"
    if Path(spec).expanduser().exists():
        return "folder"
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path or not _HUB_ID_RE.match(spec):
        raise ModelLoadError(
            f"no model folder at {spec!r} (and it is not a Hub id like 'org/name'); check the "
            f"path, or use {BUILTIN!r} for the built-in organism"
        )
    return "hub"


def load_model(
    spec: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    remote: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    prompt_format: PromptFormat | str | None = None,
) -> ModelHandle:
    """Load ``spec`` (``"builtin"``, a local folder, or a Hub id) as a ``ModelHandle``.

    An existing local path wins over a Hub id of the same name.
    ``device="auto"`` picks CUDA when available. ``dtype=None`` is float32 on CPU and the
    checkpoint's dtype on accelerators. ``remote=True`` prepares an NDIF run: nothing is loaded
    locally (a meta skeleton only), it needs a Hub id, network and an NDIF API key. The prompt
    format defaults to ``CompactFormat`` for the organism and ``CodeFormat`` otherwise; a format
    name (``compact``, ``code``, ``code-chat``) or instance overrides it. Raises
    ``ModelLoadError`` (or ``UnsupportedArchitectureError``) with what failed and what to do.
    """
    kind = _classify(spec)
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
        hf_model = LlamaForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        model_id, rev = "seqpatch/organism", _folder_revision(folder)
    else:
        source = str(Path(spec).expanduser().resolve()) if kind == "folder" else spec
        if kind == "folder" and not (Path(source) / "config.json").is_file():
            raise ModelLoadError(
                f"{source} is not a model folder: it has no config.json (expected the output "
                "of save_pretrained or a Hub snapshot)"
            )
        try:
            config = _load_config(source, revision, trust_remote_code)
            adapter_for(config)  # fail on an unknown architecture before loading weights
            hf_model = AutoModelForCausalLM.from_pretrained(
                source, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
            tokenizer = load_tokenizer(source, revision, trust_remote_code)
        except (OSError, HfHubHTTPError) as error:
            if kind == "folder":
                raise ModelLoadError(
                    f"could not load the model folder {source}: {error}"
                ) from error
            raise _hub_error(spec, error) from error
        model_id = source
        if kind == "folder":
            rev = revision or _folder_revision(Path(source))
        else:
            rev = getattr(config, "_commit_hash", None) or revision
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
        _probe_hub(spec, revision)
        model = TransformersModel(
            spec, task="text-generation", revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, HfHubHTTPError, httpx.HTTPError) as error:
        raise _hub_error(spec, error, remote=True) from error
    hf_model = model._module
    rev = getattr(hf_model.config, "_commit_hash", None) or revision
    return _make_handle(
        spec, spec, rev, hf_model, model.tokenizer, kind, prompt_format, True, model
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
    if isinstance(fmt, CodeFormat) and fmt.chat and fmt.tokenizer is None:
        fmt = fmt.with_tokenizer(tokenizer)
    return fmt
