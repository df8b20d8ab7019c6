"""``ModelHandle``: a loaded model with everything the pipeline needs to run and intervene on it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seqpatch.models.adapters import ArchitectureAdapter
from seqpatch.models.batching import pad_left
from seqpatch.models.errors import AnswerTokenizationError
from seqpatch.models.sites import Site, SiteError, SiteRef, site_info
from seqpatch.prompts import PromptFormat

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedModel

    from seqpatch.programs import Program


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
        """Where ``site`` of ``layer`` is read: module, input or output, and the head split
        (the site table's row, placed by this model's adapter)."""
        layer = self._layer_index(layer)
        info = site_info(site)
        if info.module is None:
            raise SiteError(
                f"{site!r} lives in the architecture's q/k/v layout; use "
                "seqpatch.interventions.sites.site_ref for it"
            )
        base = f"{self.adapter.layers}.{layer}"
        path = f"{base}.{getattr(self.adapter, info.module)}" if info.module else base
        n_heads = self.n_heads if info.per_head else None
        return SiteRef(info.name, layer, path, self.submodule(path), info.kind, n_heads)  # type: ignore[arg-type]

    def site_width(self, site: str) -> int:
        """The last dimension of ``site`` per position (per head for head sites)."""
        width = site_info(site).width
        config = self.hf_model.config.get_text_config()
        if width == "d_mlp":
            return self.adapter.d_mlp(config)
        return self.d_head if width == "d_head" else self.d_model

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

    def logits_from_resid(
        self, resid: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final norm, unembedding and (Gemma 2) logit soft-capping applied to a residual state
        ``[n, d]``.

        ``columns`` (``[n, C]`` token ids) computes those logits only, ``[n, C]``: a method
        that reads a few candidates (DAS reads ten digits of Gemma-3's 262,144 tokens) need not
        pay for — or back-propagate through — the whole vocabulary.
        """
        normed = self.submodule(self.adapter.final_norm)(resid)
        unembed = self.submodule(self.adapter.unembed)
        if columns is None:
            logits = unembed(normed)
        elif isinstance(unembed, torch.nn.Linear):
            logits = (unembed.weight[columns] @ normed.unsqueeze(-1)).squeeze(-1)
            if unembed.bias is not None:
                logits = logits + unembed.bias[columns]
        else:
            logits = unembed(normed).gather(-1, columns)
        cap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def encode(self, prompts: str | Sequence[str]) -> BatchEncoding:
        """Tokenize prompts as one left-padded batch on the model's device.

        A padded batch carries ``position_ids`` counted from each row's first real token (as
        nnsight adds them), so padding shifts no position and a plain ``hf_model(**batch)``
        sees exactly what a trace sees.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = pad_left(self.tokenizer, [self.tokenizer(p)["input_ids"] for p in prompts])
        if bool(batch["attention_mask"].all()):
            del batch["position_ids"]  # unpadded: the model's own positions are these
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
