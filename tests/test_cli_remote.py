"""``--remote``: which commands offer it, how it fails offline, and the code it runs on NDIF.

NDIF itself cannot be reached from a test. What runs there is checked with nnsight's serverless
simulation of a remote request (``remote="local"``), made stricter here the way NDIF is
stricter: the trace is serialized, then deserialized with seqpatch unimportable (NDIF does not
have it installed), run on its own copy of the block's variables, and only the values the block
saved come back. Those runs must equal a direct ``transformers`` computation.
"""

from __future__ import annotations

import dataclasses
import linecache
import random
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from typer.testing import CliRunner

from seqpatch import models as model_api
from seqpatch.cli import app
from seqpatch.interventions import get_activations, patch_and_run
from seqpatch.models import ModelHandle, load_model, teacher_forced
from seqpatch.pipeline import build_benchmark
from seqpatch.programs import make_sequence
from seqpatch.stages import benchmark
from seqpatch.stages.base import split_model_spec
from seqpatch.stages.benchmark import BenchmarkConfig
from seqpatch.store import Store, load_stage
from tests.cli_output import error_line, snapshot

runner = CliRunner()
PROGRAMS = ["--family", "arithmetic", "--seq-lens", "1,3", "--n-per-len", "3", "--seed", "5"]


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def handles(models: dict[str, str]) -> dict[str, ModelHandle]:
    out = {}
    for key, spec in models.items():
        name, fmt = split_model_spec(spec)
        out[key] = load_model(name, prompt_format=fmt)
    return out


# ---------------------------------------------------------------------------------------------
# Which commands offer --remote


@pytest.mark.parametrize(
    ("command", "offered"),
    [
        (["build", "benchmark"], True),
        (["build", "activations"], True),
        (["build", "pairs"], False),  # scores with the local module directly
        (["build", "patching"], False),  # the sweep engine needs local module internals
        (["merge"], False),
        (["run"], False),
    ],
)
def test_remote_is_offered_only_where_it_can_run(command: list[str], offered: bool) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert ("--remote" in result.output) == offered
    if offered:
        assert "NDIF_API_KEY" in result.output and "NDIF" in result.output


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing written


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty model cache, whatever the environment."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture
def offline(no_hub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def unreachable_hub(no_hub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not offline mode, but the Hub is a closed local port: every request is refused."""
    import huggingface_hub.constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again on leaving: connections are refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )


@pytest.fixture
def ndif_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", "not-a-real-key")


@pytest.fixture
def no_ndif_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


@pytest.fixture
def programs_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    result = invoke("build", "programs", *PROGRAMS, "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    return data_dir


def _remote_benchmark_fails(data_dir: Path, model: str) -> str:
    before = snapshot(data_dir)
    start = time.perf_counter()
    result = invoke("build", "benchmark", "--models", model, "--remote", "--data-dir", data_dir)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    assert snapshot(data_dir) == before
    assert elapsed < 10, f"took {elapsed:.1f} s"
    return error_line(result.stderr)


def test_remote_without_an_ndif_key(programs_dir: Path, offline: None, no_ndif_key: None) -> None:
    error = _remote_benchmark_fails(programs_dir, "Qwen/Qwen2.5-0.5B")
    assert "needs an NDIF API key" in error and "NDIF_API_KEY" in error


def test_remote_with_a_local_model(
    programs_dir: Path, models: dict[str, str], offline: None, ndif_key: None
) -> None:
    for spec in ("builtin", models["bpe"]):
        error = _remote_benchmark_fails(programs_dir, spec)
        assert "named by Hub id" in error and "drop remote=True" in error


def test_remote_with_an_unreachable_hub_fails_fast(
    programs_dir: Path, unreachable_hub: None, ndif_key: None
) -> None:
    """No retries: without the probe, huggingface_hub backs off for about half a minute."""
    error = _remote_benchmark_fails(programs_dir, "Qwen/Qwen2.5-0.5B")
    assert "could not load 'Qwen/Qwen2.5-0.5B' from the Hugging Face Hub" in error
    assert "the Hub could not be reached" in error and "needs the network" in error


def test_remote_in_offline_mode(programs_dir: Path, offline: None, ndif_key: None) -> None:
    error = _remote_benchmark_fails(programs_dir, "Qwen/Qwen2.5-0.5B")
    assert "HF_HUB_OFFLINE is set" in error and "needs the network" in error


def _store_pairs(data_dir: Path, model: str) -> None:
    """A stored pairs version whose config names ``model`` (all activations reads of it)."""
    rows = Dataset.from_dict({"pair_id": ["p0"]})
    Store(data_dir).get_or_build("pairs", 1, {"model": model}, lambda: rows)


def test_remote_activations_errors(
    tmp_path: Path, models: dict[str, str], offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nnsight import CONFIG

    data_dir = tmp_path / "data"
    _store_pairs(data_dir, models["bpe"])
    before = snapshot(data_dir)
    args = ["build", "activations", "--remote", "--data-dir", data_dir]

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    result = invoke(*args)
    assert result.exit_code == 2
    assert "needs an NDIF API key" in error_line(result.stderr)
    result = invoke(*args, "--from", tmp_path / "no-export-here")  # checked before importing
    assert result.exit_code == 2
    assert "needs an NDIF API key" in error_line(result.stderr)

    monkeypatch.setattr(CONFIG.API, "APIKEY", "not-a-real-key")
    result = invoke(*args)
    assert result.exit_code == 2
    assert "drop remote=True" in error_line(result.stderr)
    assert snapshot(data_dir) == before


# ---------------------------------------------------------------------------------------------
# The code that runs on NDIF


@pytest.fixture
def ndif_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """``remote="local"`` runs as strictly as NDIF would (see the module docstring)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.util import push

    def run_like_ndif(self, tracer) -> None:  # type: ignore[no-untyped-def]
        blob = RequestModel.serialize(tracer, compress=False)
        persistent = self.model._remoteable_persistent_objects()
        filename = tracer.info.frame.f_code.co_filename
        line = linecache.cache.get(filename)
        hidden = self._hide_local_modules()
        finders = [f for f in sys.meta_path if "seqpatch" in repr(f)]  # an editable install
        for finder in finders:
            sys.meta_path.remove(finder)
        try:
            restored = RequestModel.deserialize(blob, persistent, compress=False)
        finally:
            sys.meta_path[:0] = finders
            self._restore(hidden)
            if line is not None:
                linecache.cache[filename] = line
            else:
                linecache.cache.pop(filename, None)
        frame = restored.info.frame  # the server's own copy of the block's variables
        shipped = {name: id(value) for name, value in frame.f_locals.items()}
        restored.execute(restored.info.code)
        saved = {k: v for k, v in frame.f_locals.items() if shipped.get(k) != id(v)}
        push(tracer.info.frame, saved)  # only the saved values come back

    monkeypatch.setattr(LocalSimulationBackend, "__call__", run_like_ndif)


def _simulated(handle: ModelHandle) -> ModelHandle:
    """``handle`` whose traces go through the NDIF simulation (``remote`` is passed to nnsight)."""
    return dataclasses.replace(handle, remote="local", _modules={})  # type: ignore[arg-type]


def _pad_id(handle: ModelHandle) -> int:
    tok = handle.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def _pad_left(seqs: Sequence[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Left-padded ``input_ids, attention_mask, position_ids``, written here independently of
    ``seqpatch.models.pad_left`` (positions count from each row's first real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _direct_teacher_forced(
    handle: ModelHandle, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]]
) -> tuple[list[float], list[int]]:
    """The benchmark's teacher-forced scoring as a plain ``transformers`` forward (its code
    before it went through nnsight)."""
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    ids, mask, positions = _pad_left(seqs, _pad_id(handle))
    keep = max(len(a) for a in answer_ids) + 1
    out = handle.hf_model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
    )
    logits = out.logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    logprobs, ranks = [], []
    for row, answer in enumerate(answer_ids):
        start = keep - 1 - len(answer)
        cols = torch.arange(start, start + len(answer))
        logprobs.append(float(logprobs_all[row, cols, torch.tensor(answer)].sum()))
        first = logits[row, start]
        ranks.append(int((first > first[answer[0]]).sum()) + 1)
    return logprobs, ranks


def _direct_greedy(handle: ModelHandle, prompt_ids: Sequence[list[int]], max_new: int) -> Any:
    ids, mask, _ = _pad_left(prompt_ids, _pad_id(handle))
    return handle.hf_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        num_beams=1,
        pad_token_id=_pad_id(handle),
        eos_token_id=handle.tokenizer.eos_token_id,
    )


def _batch(handle: ModelHandle, n: int = 6) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of different lengths (a padded batch) with one- and multi-token answers."""
    fmt = handle.prompt_format
    programs = [make_sequence("arithmetic", 1 + i % 3, random.Random(i)) for i in range(n)]
    prompts = [fmt.prompt(p) for p in programs]
    answers = [p.answer if i % 2 else -37 * (i + 1) for i, p in enumerate(programs)]
    prompt_ids = [list(handle.tokenizer(p)["input_ids"]) for p in prompts]
    answer_ids = [
        handle.answer_token_ids([a], prompt=p)[0] for a, p in zip(answers, prompts, strict=True)
    ]
    return prompt_ids, answer_ids


@pytest.mark.parametrize("where", ["local", "ndif-simulation"])
@pytest.mark.parametrize("model", ["word", "bpe"])
def test_benchmark_passes_through_nnsight_equal_direct_transformers(
    handles: dict[str, ModelHandle], model: str, where: str, ndif_simulation: None
) -> None:
    handle = handles[model]
    runs = handle if where == "local" else _simulated(handle)
    prompt_ids, answer_ids = _batch(handle)
    assert len({len(p) for p in prompt_ids}) > 1 and max(len(a) for a in answer_ids) > 1
    with torch.no_grad():
        forced = teacher_forced(runs, prompt_ids, answer_ids)
        logprobs, ranks = forced.logprobs, forced.ranks
        expected_logprobs, expected_ranks = _direct_teacher_forced(handle, prompt_ids, answer_ids)
        continuations = benchmark._greedy(runs, prompt_ids, 6)
        generated = _direct_greedy(handle, prompt_ids, 6)
    assert ranks == expected_ranks
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True)) <= 1e-5
    width = max(len(p) for p in prompt_ids)
    tok = handle.tokenizer
    expected = []
    for row in generated[:, width:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        expected.append(tok.decode(row, skip_special_tokens=True).split("\n", 1)[0])
    assert continuations == expected


def test_building_blocks_run_under_the_ndif_simulation(
    handles: dict[str, ModelHandle], ndif_simulation: None
) -> None:
    """``build activations --remote`` runs ``get_activations``; ``patch_and_run`` too."""
    handle = handles["bpe"]
    fmt = handle.prompt_format
    prompts = [fmt.prompt(make_sequence("arithmetic", n, random.Random(n))) for n in (1, 3)]
    sites = ["resid_pre", "attn_out", "mlp_out", "head"]
    with torch.no_grad():
        remote = get_activations(_simulated(handle), prompts, sites)
        local = get_activations(handle, prompts, sites)
        ids = torch.tensor(handle.tokenizer(prompts[1])["input_ids"])
        remote_ids = get_activations(_simulated(handle), ids, ["resid_post"], layers=[1])
        local_ids = get_activations(handle, ids, ["resid_post"], layers=[1])
    for site in sites:
        assert torch.equal(remote[site].nan_to_num(7.0), local[site].nan_to_num(7.0)), site
    assert torch.equal(remote_ids["resid_post"], local_ids["resid_post"])

    src = "x = 3\n# The final value of x is"
    tgt = "x = 5\n# The final value of x is"
    for site in ("resid_pre", "attn_out", "mlp_out"):
        remote_patch = patch_and_run(_simulated(handle), src, tgt, 1, 2, site)
        local_patch = patch_and_run(handle, src, tgt, 1, 2, site)
        assert remote_patch.delta == local_patch.delta
        assert torch.equal(remote_patch.patched_logits, local_patch.patched_logits)


def test_a_remote_benchmark_has_the_local_version_and_rows(
    programs_dir: Path,
    tmp_path: Path,
    models: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    ndif_simulation: None,
    ndif_key: None,
) -> None:
    """``remote`` is not in the version; the rows of a (simulated) NDIF run equal a local run's."""
    cfg = BenchmarkConfig((models["word"],), batch_size=4, max_new_tokens=3)
    local = build_benchmark(cfg, data_dir=programs_dir)

    real_load = model_api.load_model
    loaded: list[bool] = []

    def load_simulated(name: str, *args: Any, remote: bool = False, **kwargs: Any) -> ModelHandle:
        """NDIF's copy of a model: loaded here, its traces sent through the simulation."""
        loaded.append(remote)
        handle = real_load(name, *args, **kwargs)
        return _simulated(handle) if remote else handle

    real_open = benchmark._open
    used: list[Any] = []

    def open_recorded(inputs: Any, spec: str) -> ModelHandle:
        handle = real_open(inputs, spec)
        used.append(handle.remote)
        return handle

    monkeypatch.setattr(model_api, "load_model", load_simulated)
    monkeypatch.setattr(benchmark, "_open", open_recorded)
    other = tmp_path / "other"
    assert invoke("build", "programs", *PROGRAMS, "--data-dir", other).exit_code == 0
    remote = build_benchmark(cfg, data_dir=other, remote=True)
    assert loaded == [True]  # NDIF's copy, opened once for identity, check and run
    assert used == ["local", "local"]  # checked, then run, both through the simulation
    assert remote.version == local.version
    assert remote.provenance["extra"]["models"][models["word"]]["remote"] is True
    assert "remote" not in local.provenance["extra"]["models"][models["word"]]
    local_rows, remote_rows = load_stage("benchmark", programs_dir), load_stage("benchmark", other)
    for column in ("continuation", "answer_rank", "correct", "answer_logprob"):
        assert remote_rows[column] == local_rows[column], column
