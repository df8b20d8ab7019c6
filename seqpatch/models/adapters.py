"""One ``ArchitectureAdapter`` per supported architecture: where its modules live, by name.

Supporting a new architecture is one entry in ``ADAPTERS``: the module paths of its embeddings,
decoder layers, attention, MLP, attention output projection, final norm and unembedding, and —
for the sweep's compute-floor layer runner (``seqpatch.interventions._layers``) — the path of its
rotary embedding and the keyword its decoder layers take the cache under. An adapter without
``rotary`` still supports every site and method; its sweeps take the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from seqpatch.models.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one architecture (dotted, as in ``named_modules``).

    ``embed``, ``layers``, ``final_norm``, ``unembed`` and ``rotary`` are relative to the
    ``*ForCausalLM`` root; ``attn``, ``mlp``, ``attn_o_proj`` and ``mlp_down`` are relative to one
    decoder layer. Which site reads which of them is the site table's business
    (``seqpatch.models.sites.SITE_TABLE``).
    ``rotary`` is ``None`` where the model's forward cannot be replayed layer by layer (GPT-2's
    attention keeps its own cache layout and has no rotary module).
    """

    model_type: str
    embed: str
    layers: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    attn_o_proj: str
    mlp_down: str = "mlp.down_proj"  # the MLP's output projection: its input is ``mlp_post``
    rotary: str | None = None
    cache_kwarg: str = "cache"  # keyword under which a decoder layer receives the cache

    def n_layers(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    def n_heads(self, config: PretrainedConfig) -> int:
        return int(config.num_attention_heads)

    def d_model(self, config: PretrainedConfig) -> int:
        return int(config.hidden_size)

    def d_mlp(self, config: PretrainedConfig) -> int:
        """Width of the MLP's hidden activation (``mlp_post``)."""
        for name in ("intermediate_size", "n_inner"):
            value = getattr(config, name, None)
            if value:
                return int(value)
        return 4 * self.d_model(config)  # GPT-2's default when n_inner is None

    def d_head(self, config: PretrainedConfig) -> int:
        head_dim = getattr(config, "head_dim", None)
        return int(head_dim) if head_dim else self.d_model(config) // self.n_heads(config)


def _llama_like(model_type: str, **overrides: Any) -> ArchitectureAdapter:
    paths = {
        "embed": "model.embed_tokens",
        "layers": "model.layers",
        "final_norm": "model.norm",
        "unembed": "lm_head",
        "attn": "self_attn",
        "mlp": "mlp",
        "attn_o_proj": "self_attn.o_proj",
        "rotary": "model.rotary_emb",
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
        # Gemma 3 text models: attn_out/mlp_out are the attention/MLP outputs *before* the
        # post-attention/post-feedforward norms, as for Gemma 2; the rotary module serves both
        # layer types (a rope base each) and the layer runner asks it per layer type.
        _llama_like("gemma3_text"),
        _llama_like("phi3"),
        _llama_like(
            "phi",
            final_norm="model.final_layernorm",
            attn_o_proj="self_attn.dense",
            mlp_down="mlp.fc2",
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
            mlp_down="mlp.c_proj",
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
            mlp_down="mlp.dense_4h_to_h",
            rotary="gpt_neox.rotary_emb",
            cache_kwarg="layer_past",
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
