"""load_model and the architecture adapters, on tiny random-weight models saved to disk.

Each architecture is saved with ``save_pretrained`` and loaded back through the real local-folder
path. Site names are proven right by the model's own arithmetic: ``resid_post[l]`` is the next
layer's input, the residual stream is the sum of its parts, ``o_proj(head)`` is ``attn_out``, and
final norm + unembedding of the last ``resid_post`` reproduce the logits.
"""

import dataclasses
import json
import socket
import time
from contextlib import contextmanager

import pytest
import torch

import seqpatch.organism
from seqpatch.interventions._layers import supports_layer_runner
from seqpatch.models import (
    ADAPTERS,
    SITES,
    AnswerTokenizationError,
    ModelLoadError,
    SiteError,
    UnsupportedArchitectureError,
    identify,
    load_model,
    pad_left,
    teacher_forced,
)
from seqpatch.prompts import CodeFormat, CompactFormat, PromptFormatError
from seqpatch.testing import (
    TINY_ARCHITECTURES,
    build_tiny_model,
    build_tiny_tokenizer,
    save_tiny_model,
    tiny_config,
)

PROMPTS = ["x = 0\nx += 3\nx -= 2", "x = 0\nx -= 4\nx += 1"]  # equal token length: no padding


@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        arch: load_model(str(save_tiny_model(arch, root / arch))) for arch in TINY_ARCHITECTURES
    }


def capture_with_hooks(handle, batch):
    """Every site of every layer, read with plain torch hooks on the adapter's modules."""
    values, hooks = {}, []
    for layer in range(handle.n_layers):
        for site in SITES:
            ref = handle.module(site, layer)

            def keep(x, key=(site, layer)):
                values[key] = x.detach().clone()

            hooks.append(ref.hook(keep))
    try:
        with torch.no_grad():
            logits = handle.hf_model(**batch).logits
    finally:
        for hook in hooks:
            hook.remove()
    return values, logits


def test_every_supported_architecture_has_a_tiny_model():
    assert set(TINY_ARCHITECTURES) == set(ADAPTERS)


def test_tiny_gemma3_has_local_and_global_layers_with_their_own_rope():
    """The exactness tests rely on this: prompts longer than the window, both layer types."""
    config = tiny_config("gemma3")
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 2
    assert sorted(config.layer_types) == ["full_attention", "sliding_attention"]
    assert config.sliding_window == 4  # test prompts are 10-20 tokens
    theta = {kind: config.rope_parameters[kind]["rope_theta"] for kind in config.layer_types}
    assert theta["sliding_attention"] != theta["full_attention"]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_sites_have_the_right_shapes_and_meaning(handles, arch):
    h = handles[arch]
    assert h.adapter.model_type == arch
    assert h.hf_model is h.model._module and not h.hf_model.training
    assert (h.n_layers, h.n_heads, h.d_model) == (2, 4, 64)
    batch = h.encode(PROMPTS)
    assert "position_ids" not in batch
    b, t = batch["input_ids"].shape
    acts, logits = capture_with_hooks(h, batch)
    assert len(acts) == h.n_layers * len(SITES)
    for (site, _layer), x in acts.items():
        want = (b, t, h.n_heads, h.d_head) if site == "head" else (b, t, h.d_model)
        assert tuple(x.shape) == want, site
    for layer in range(h.n_layers - 1):
        assert torch.equal(acts["resid_post", layer], acts["resid_pre", layer + 1])
    for layer in range(h.n_layers):
        o_proj = h.module("head", layer).module
        with torch.no_grad():
            recomposed = o_proj(acts["head", layer].flatten(-2))
        torch.testing.assert_close(recomposed, acts["attn_out", layer])
        if arch not in ("gemma2", "gemma3_text"):  # these norm attn_out/mlp_out before adding
            parts = acts["resid_pre", layer] + acts["attn_out", layer] + acts["mlp_out", layer]
            torch.testing.assert_close(parts, acts["resid_post", layer])
    with torch.no_grad():
        lens = h.logits_from_resid(acts["resid_post", h.n_layers - 1])
    torch.testing.assert_close(lens, logits)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_nnsight_reads_the_same_values_as_plain_hooks(handles, arch):
    h = handles[arch]
    batch = h.encode(PROMPTS)
    acts, logits = capture_with_hooks(h, batch)
    order = ("resid_pre", "head", "attn_out", "mlp_out", "resid_post")  # execution order
    saved = {}
    with torch.no_grad(), h.trace(batch):
        for layer in range(h.n_layers):
            for site in order:
                saved[site, layer] = h.read(site, layer).save()
        traced_logits = h.model.output.logits.save()
    for key, value in saved.items():
        assert torch.equal(value, acts[key]), key
    assert torch.equal(traced_logits, logits)


def test_resid_pre_is_what_layer_zero_receives(handles):
    """GPT-2 adds position embeddings after ``wte``: resid_pre[0] is not the embed output."""
    h = handles["gpt2"]
    batch = h.encode(PROMPTS)
    acts, _ = capture_with_hooks(h, batch)
    ids = batch["input_ids"]
    with torch.no_grad():
        wte = h.submodule(h.adapter.embed)(ids)
        wpe = h.hf_model.transformer.wpe(torch.arange(ids.shape[1]))
    torch.testing.assert_close(acts["resid_pre", 0], wte + wpe)
    assert not torch.allclose(acts["resid_pre", 0], wte)


def test_padded_batches_match_unpadded_runs(handles):
    h = handles["gpt2"]  # absolute positions: padding would shift them without position_ids
    short, long = "a = 1", "x = 0\nx += 3\nx //= 2"
    batch = h.encode([short, long])
    assert (
        batch["attention_mask"][0, 0] == 0 and batch["input_ids"][0, 0] == h.tokenizer.pad_token_id
    )
    with torch.no_grad():
        padded = h.hf_model(**batch).logits[0, -1]
        alone = h.hf_model(**h.encode(short)).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_hooks_can_replace_a_site(handles):
    h = handles["llama"]
    batch = h.encode(PROMPTS)
    acts, _ = capture_with_hooks(h, batch)
    last = h.n_layers - 1
    hook = h.module("mlp_out", last).hook(torch.zeros_like)
    try:
        with torch.no_grad():
            logits = h.hf_model(**batch).logits
    finally:
        hook.remove()
    with torch.no_grad():
        want = h.logits_from_resid(acts["resid_pre", last] + acts["attn_out", last])
    torch.testing.assert_close(logits, want)


def test_site_errors(handles):
    h = handles["llama"]
    with pytest.raises(SiteError, match="resid_pre"):
        h.module("resid_mid", 0)
    with pytest.raises(SiteError, match="out of range"):
        h.module("resid_pre", 2)
    assert h.module("resid_post", -1).layer == 1
    assert h.layer(-1) is h.hf_model.model.layers[1]


def test_handle_describes_itself(handles):
    h = handles["qwen3"]
    info = h.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["model_type"] == "qwen3" and info["d_head"] == 8 and info["n_params"] == h.n_params
    assert info["revision"].startswith("sha256:")
    assert h.n_params == sum(p.numel() for p in h.hf_model.parameters())
    assert h.device == torch.device("cpu") and h.dtype == torch.float32


def test_answer_token_ids_for_digits(handles):
    h = handles["llama"]
    assert isinstance(h.prompt_format, CodeFormat)
    ids = h.answer_token_ids(range(10))
    assert all(len(x) == 1 for x in ids)
    assert len({x[0] for x in ids}) == 10
    assert [h.tokenizer.decode(x) for x in ids] == [f" {d}" for d in range(10)]
    assert len(h.answer_token_ids([-12])[0]) > 1


class BoundaryMergingFormat(CompactFormat):
    def answer_text(self, value: int) -> str:
        return f"= {value}"


class UnknownPieceFormat(CompactFormat):
    def answer_text(self, value: int) -> str:
        return f"{value}!"


def test_prompt_ids_feed_counterfactual_pairs(handles):
    import random

    from seqpatch.pairs import make_counterfactual_pair

    h = handles["llama"]
    a, b, meta = make_counterfactual_pair(4, 1, random.Random(0), "arithmetic", h.prompt_ids)
    assert len(h.prompt_ids(a)) == len(h.prompt_ids(b)) == meta.n_tokens
    assert h.prompt_ids(a)[0] == h.tokenizer.bos_token_id
    assert h.prompt_ids(a) == h.encode(h.prompt_format.prompt(a))["input_ids"][0].tolist()


def test_answer_token_ids_errors(tmp_path):
    folder = save_tiny_model("llama", tmp_path / "bpe")
    h = load_model(str(folder), prompt_format=BoundaryMergingFormat())
    with pytest.raises(AnswerTokenizationError, match="merges across the boundary"):
        h.answer_token_ids([3], prompt="x +")  # 'x', ' +' then ' +=' once '=' follows
    folder = save_tiny_model("llama", tmp_path / "word", tokenizer="wordlevel")
    h = load_model(str(folder), prompt_format=UnknownPieceFormat())
    with pytest.raises(AnswerTokenizationError, match="unknown to the tokenizer"):
        h.answer_token_ids([3])


def test_builtin_loads_the_organism_weights_dir(tmp_path, monkeypatch):
    folder = save_tiny_model("llama", tmp_path / "organism", tokenizer="wordlevel")
    monkeypatch.setattr(seqpatch.organism, "WEIGHTS_DIR", folder, raising=False)
    h = load_model("builtin")
    assert isinstance(h.prompt_format, CompactFormat)
    assert h.model_id == "seqpatch/organism" and h.revision.startswith("sha256:")
    reference = build_tiny_tokenizer("wordlevel")
    text = "a=5;b=a;c//=3;#b:"
    assert h.tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    ids = h.answer_token_ids(range(10))
    assert [h.tokenizer.convert_ids_to_tokens(x) for x in ids] == [[str(d)] for d in range(10)]
    assert isinstance(load_model("builtin", prompt_format="code").prompt_format, CodeFormat)


def test_builtin_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(seqpatch.organism, "WEIGHTS_DIR", tmp_path / "missing", raising=False)
    with pytest.raises(ModelLoadError, match="seqpatch organism train"):
        load_model("builtin")


def test_wordlevel_tokenizer_survives_a_qwen2_config(tmp_path):
    folder = save_tiny_model("qwen2", tmp_path / "q", tokenizer="wordlevel")
    h = load_model(str(folder))
    text = "a=5;b=a;#b:"
    assert h.tokenizer.convert_ids_to_tokens(h.tokenizer(text)["input_ids"]) == list(text)
    assert h.tokenizer.decode(h.tokenizer(text)["input_ids"]) == text


def test_chat_format_needs_a_template(tmp_path):
    folder = save_tiny_model("llama", tmp_path / "m")
    with pytest.raises(PromptFormatError, match="no chat template"):
        load_model(str(folder), prompt_format="code-chat")


def test_dtype_option(tmp_path):
    folder = save_tiny_model("gpt2", tmp_path / "m")
    h = load_model(str(folder), dtype="bfloat16", device="cpu")
    assert h.dtype == torch.bfloat16 and h.describe()["dtype"] == "bfloat16"
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(folder), dtype="float7")


def test_unknown_architecture_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedArchitectureError, match="bert") as info:
        load_model(str(tmp_path))
    assert all(arch in str(info.value) for arch in ADAPTERS)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_model("./not/a/folder")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub access and an empty cache, whatever the environment."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_unreachable_hub_id_fails_fast_and_clearly(offline):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        load_model("seqpatch-test/no-such-model")
    assert "seqpatch-test/no-such-model" in str(info.value)
    assert time.perf_counter() - start < 10


def test_remote_needs_an_api_key_and_the_hub(offline, monkeypatch, tmp_path):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(ModelLoadError, match="NDIF API key"):
        load_model("seqpatch-test/no-such-model", remote=True)
    monkeypatch.setattr(CONFIG.API, "APIKEY", "not-a-real-key")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"could not load .* from the Hugging Face Hub"):
        load_model("seqpatch-test/no-such-model", remote=True)
    assert time.perf_counter() - start < 10
    with pytest.raises(ModelLoadError, match="drop remote=True"):
        load_model(str(save_tiny_model("gpt2", tmp_path / "m")), remote=True)


def test_tiny_models_are_deterministic():
    a, _ = build_tiny_model("llama", seed=1)
    b, _ = build_tiny_model("llama", seed=1)
    c, _ = build_tiny_model("llama", seed=2)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name])
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_bpe_tokenizer_gives_ops_different_lengths():
    tok = build_tiny_tokenizer("bpe")
    assert len(tok("x //= 3")["input_ids"]) != len(tok("x += 3")["input_ids"])
    assert tok("x = 1")["input_ids"][0] == tok.bos_token_id
    text = "x = 0\nx = abs(x - 3)\n# The final value of x is -12"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    word = build_tiny_tokenizer("wordlevel")
    assert word.unk_token_id not in word("a=5;b=a;x//=3;x=abs(x-3);#b:")["input_ids"]


# ---------------------------------------------------------------------------------------------
# identify: the identity load_model records, without loading a model


def _identity(handle) -> dict:
    described = handle.describe()
    return {"model_id": described["model_id"], "revision": described["revision"]}


@contextmanager
def no_model_construction():
    """Inside: any attempt to build a transformers model (from a folder or the Hub) fails."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("identify() must not construct a model")

    with pytest.MonkeyPatch.context() as patch:
        for cls in (transformers.PreTrainedModel, transformers.AutoModelForCausalLM):
            patch.setattr(cls, "from_pretrained", refuse)
        yield


def test_identify_equals_the_loaded_identity(tmp_path):
    folder = save_tiny_model("gpt2", tmp_path / "m")
    specs = ["builtin", str(folder), str(tmp_path / "m" / ".." / "m")]
    with no_model_construction():
        identities = [identify(spec) for spec in specs]
        with pytest.raises(AssertionError, match="must not construct"):
            load_model(str(folder))  # the guard is real
    for spec, identity in zip(specs, identities, strict=True):
        assert identity == _identity(load_model(spec)), spec
    assert identities[0]["model_id"] == "seqpatch/organism"
    assert identities[1] == identities[2] and identities[1]["model_id"] == str(folder)
    assert identify(str(folder), revision="v1")["revision"] == "v1"
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert identify(str(folder))["revision"] != identities[1]["revision"]  # content, not path


def test_identify_a_hub_id_from_the_local_cache(offline, tmp_path):
    """Offline, a Hub id in the cache has the commit ``transformers`` reports when loading it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--seqpatch-test--tiny"
    save_tiny_model("llama", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with no_model_construction():
        identity = identify("seqpatch-test/tiny")
    assert identity == {"model_id": "seqpatch-test/tiny", "revision": commit}
    assert _identity(load_model("seqpatch-test/tiny")) == identity
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        identify("seqpatch-test/not-cached")
    with pytest.raises(ModelLoadError, match="no model folder"):
        identify(str(tmp_path / "nowhere"))


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """Not offline mode, but every Hub request is refused (a closed local port); the sleeps of
    any retry with backoff are recorded instead of waited for."""
    import huggingface_hub.constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again on leaving: connections are refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # retries would sleep: recorded, not waited
    return slept


@pytest.mark.parametrize("spec", ["gpt9", "seqpatch-test/no-such-model"])
def test_a_hub_id_that_cannot_be_reached_fails_at_once(unreachable_hub, spec):
    for call in (load_model, identify):
        with pytest.raises(ModelLoadError, match="could not be reached") as info:
            call(spec)
        message = str(info.value)
        assert "\n" not in message and f"hf download {spec}" in message
        assert ("Hub ids look like 'org/name'" in message) == ("/" not in spec)
    assert unreachable_hub == []  # one request each, no retries


@pytest.mark.parametrize(
    ("spec", "meant"),
    [
        ("smollm2-135m", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("gemma3-270", "gemma3-270m"),
        ("buitin", "builtin"),
    ],
)
def test_a_misspelled_registry_name_fails_offline_with_did_you_mean(monkeypatch, spec, meant):
    """No Hub request at all (the probe would fail the test), one line naming the right name."""
    from seqpatch.models import loading

    def no_network(*args, **kwargs):
        raise AssertionError("a misspelled registry name must not reach the Hub")

    monkeypatch.setattr(loading, "_probe_hub", no_network)
    for call in (load_model, identify):
        start = time.perf_counter()
        with pytest.raises(ModelLoadError, match=f"did you mean '{meant}'") as info:
            call(spec)
        assert time.perf_counter() - start < 1.0 and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Batching: one left-padding helper, one teacher-forcing function


def test_pad_left_uses_the_tokenizer_and_counts_positions_from_each_row(handles):
    tok = handles["llama"].tokenizer
    batch = pad_left(tok, [[5, 6, 7], [8]])
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gemma3_text"])
def test_teacher_forcing_matches_unpadded_forwards(handles, arch):
    """Against one plain, unpadded forward per row; the remote path (nnsight's local
    simulation of NDIF) gives exactly the local result."""
    h = handles[arch]
    prompts = [h.tokenizer(p)["input_ids"] for p in ("x = 0\nx += 3", "x = 1", "y = 2\ny -= 1")]
    with torch.no_grad():  # make the first answer the model's own greedy continuation
        greedy = h.hf_model(torch.tensor([prompts[0]])).logits[0, -1].argmax().item()
    answers = [[greedy], [11, 12, 13], [14, 15]]
    candidates = [[1, 2, greedy], [11, 12, 30], [4, 5, 6]]
    scored = [0, 2, 1]
    got = teacher_forced(h, prompts, answers, candidates, scored)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        with torch.no_grad():
            logits = h.hf_model(torch.tensor([prompt + answer])).logits[0].double()
        steps = logits[len(prompt) - 1 : -1]  # the logits predicting each answer token
        logprobs = torch.log_softmax(steps, -1)[torch.arange(len(answer)), answer]
        assert got.logprobs[row] == pytest.approx(float(logprobs.sum()), abs=1e-5)
        assert got.ranks[row] == int((steps[0] > steps[0, answer[0]]).sum()) + 1
        assert got.greedy[row] == (steps.argmax(-1).tolist() == answer)
        expected = steps[scored[row], candidates[row]].float()
        torch.testing.assert_close(got.candidate_logits[row], expected, atol=1e-5, rtol=0)
    assert got.greedy[0] and got.ranks[0] == 1
    simulated = dataclasses.replace(h, remote="local", _modules={})
    remote = teacher_forced(simulated, prompts, answers, candidates, scored)
    assert (remote.logprobs, remote.ranks, remote.greedy) == (
        got.logprobs,
        got.ranks,
        got.greedy,
    )
    assert torch.equal(remote.candidate_logits, got.candidate_logits)


def test_one_adapter_entry_says_whether_the_layer_runner_applies(handles):
    for arch, handle in handles.items():
        assert supports_layer_runner(handle) == (arch != "gpt2"), arch
        if handle.adapter.rotary is not None:
            assert isinstance(handle.submodule(handle.adapter.rotary), torch.nn.Module)
