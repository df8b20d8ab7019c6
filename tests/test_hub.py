"""Publishing stages: the exported folder is the Hub layout, loads back exactly, and pushes once.

No network: the Hub is a fake ``HfApi`` whose repo is a local folder, so the pushed files are
loaded back with ``load_dataset`` exactly like an export.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from datasets import Array3D, Dataset, Features, List, Value, load_dataset
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError
from huggingface_hub.utils import httpx

from seqpatch import hub, redact
from seqpatch.hub import HubError, StageSnapshot, export_snapshot, push_snapshot, resolve_parent

TOKEN = "hf_seqpatchTESTtoken0123456789abcdef"
LAYERS, POSITIONS, D_MODEL, CANDIDATES = 2, 6, 8, 3


def _provenance(stage: str, version: str, n: int, parent: str | None = None, **extra: Any) -> dict:
    """Provenance in the shape ``Store`` writes (``parents`` records, ``model`` record)."""
    return {
        "stage": stage,
        "version": version,
        "schema_version": 1,
        "config": {"seed": 0, "stage": stage},
        "parents": (
            [{"stage": parent, "version": f"{parent}-v1", "fingerprint": "f" * 16}]
            if parent
            else []
        ),
        "model": {"id": "builtin", "revision": "abc123"},
        "seqpatch_version": "0.1.0",
        "row_count": n,
        "fingerprint": "0" * 16,
        "created": "2025-01-01T00:00:00Z",
        "extra": extra,
    }


def programs_snapshot(n: int = 12) -> StageSnapshot:
    families = ["arithmetic", "binding"]
    rows = {
        "program_id": [f"p{i}" for i in range(n)],
        "family": [families[i % 2] for i in range(n)],
        "seq_len": [2 + i % 3 for i in range(n)],
        "text": [f"x = {i}\n#x:" for i in range(n)],
        "answer": list(range(n)),
        "intermediates": [[i, i + 1] for i in range(n)],
    }
    return StageSnapshot("programs", Dataset.from_dict(rows), _provenance("programs", "prog-v1", n))


def benchmark_snapshot() -> StageSnapshot:
    correct = [True, True, True, False, True, False, False, False]
    rows = {
        "model_id": ["m-a"] * 4 + ["m-b"] * 4,
        "program_id": [f"p{i % 4}" for i in range(8)],
        "seq_len": [2, 2, 3, 3] * 2,
        "correct": correct,
        "answer_logprob": [-0.1 * i for i in range(8)],
    }
    prov = _provenance("benchmark", "bench-v1", 8, "programs")
    return StageSnapshot("benchmark", Dataset.from_dict(rows), prov)


def pairs_snapshot(n: int = 5) -> StageSnapshot:
    rows = {
        "pair_id": list(range(n)),
        "divergence_index": [i % 2 for i in range(n)],
        "affects_query": [True, True, False, True, True][:n],
        "answers_differ": [True] * n,
        "n_tokens": [10 + i for i in range(n)],
    }
    prov = _provenance("pairs", "pairs-v1", n, "benchmark")
    return StageSnapshot("pairs", Dataset.from_dict(rows), prov)


def activations_snapshot(n: int = 6, seed: int = 0) -> StageSnapshot:
    rng = np.random.default_rng(seed)
    shape = (LAYERS, POSITIONS, D_MODEL)
    features = Features(
        {
            "pair_id": Value("int64"),
            "resid_pre_a": Array3D(shape=shape, dtype="float16"),
            "resid_pre_b": Array3D(shape=shape, dtype="float16"),
            "input_ids_a": List(Value("int32")),
        }
    )
    rows = {
        "pair_id": list(range(n)),
        "resid_pre_a": [rng.standard_normal(shape).astype(np.float16) for _ in range(n)],
        "resid_pre_b": [rng.standard_normal(shape).astype(np.float16) for _ in range(n)],
        "input_ids_a": [list(range(i + 1)) for i in range(n)],
    }
    prov = _provenance("activations", "act-v1", n, "pairs")
    return StageSnapshot("activations", Dataset.from_dict(rows, features=features), prov)


def patching_snapshot(tmp_path: Path, n: int = 4) -> StageSnapshot:
    rng = np.random.default_rng(1)
    shape = (LAYERS, POSITIONS, CANDIDATES)
    features = Features(
        {
            "pair_id": Value("int64"),
            "site": Value("string"),
            "logits": Array3D(shape=shape, dtype="float32"),
        }
    )
    rows = {
        "pair_id": [i // 2 for i in range(n)],
        "site": ["resid_pre", "mlp_out"] * (n // 2),
        "logits": [rng.standard_normal(shape).astype(np.float32) for _ in range(n)],
    }
    version_dir = tmp_path / "patching-version"
    version_dir.mkdir()
    np.save(
        version_dir / "heatmap_prob_delta.npy", rng.standard_normal((2, 1, 3, LAYERS, POSITIONS))
    )
    index = {
        "metrics": {"prob_delta": {"file": "heatmap_prob_delta.npy", "meaning": "Δ P(B)"}},
        "axes": ["site", "divergence_index", "statistic", "layer", "position"],
        "statistic": ["mean", "std", "count"],
        "sites": ["resid_pre", "mlp_out"],
        "divergence_indices": [0],
        "layers": list(range(LAYERS)),
        "labels": {"0": [f"t{i}" for i in range(POSITIONS)]},
        "heatmap.npy": {
            "metric": "prob_delta",
            "statistic": "mean",
            "axes": ["site", "divergence_index", "layer", "position"],
            "meaning": "mean over pairs of prob_delta",
        },
    }
    np.save(version_dir / "heatmap.npy", rng.standard_normal((2, 1, LAYERS, POSITIONS)))
    (version_dir / "heatmap.json").write_text(json.dumps(index))
    (version_dir / "heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\nnot-a-real-image")
    (version_dir / "heatmap.html").write_text("<html></html>")
    (version_dir / "state.json").write_text("{}")
    prov = _provenance("patching", "patch-v1", n, "activations")
    dataset = Dataset.from_dict(rows, features=features)
    return StageSnapshot("patching", dataset, prov, hub.artifact_files(version_dir))


def load_exported(folder: Path, stage: str, cache: Path) -> Dataset:
    return load_dataset(str(folder), stage, split="train", cache_dir=str(cache))


def assert_same_rows(loaded: Dataset, original: Dataset) -> None:
    assert loaded.features == original.features
    assert loaded.num_rows == original.num_rows
    got, want = loaded.with_format("numpy")[:], original.with_format("numpy")[:]
    assert set(got) == set(want)
    for column in want:
        for a, b in zip(got[column], want[column], strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Export


def test_exported_stages_load_back_with_same_rows_and_features(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    snapshots = [pairs_snapshot(), activations_snapshot(), patching_snapshot(tmp_path)]
    for snapshot in snapshots:
        export_snapshot(snapshot, folder, repo_id="alice/study")
    for snapshot in snapshots:
        loaded = load_exported(folder, snapshot.stage, tmp_path / "cache")
        assert_same_rows(loaded, snapshot.dataset)
    activations = load_exported(folder, "activations", tmp_path / "cache")
    assert activations.features["resid_pre_a"] == Array3D(
        shape=(LAYERS, POSITIONS, D_MODEL), dtype="float16"
    )
    assert json.loads((folder / "activations" / "seqpatch.json").read_text())["version"] == "act-v1"
    assert sorted(p.name for p in (folder / "patching").iterdir()) == [
        "heatmap.json",
        "heatmap.npy",
        "heatmap.png",
        "heatmap_prob_delta.npy",
        "seqpatch.json",
        "train-00000-of-00001.parquet",
    ]


def test_large_stage_is_split_into_bounded_shards_in_row_order(tmp_path: Path) -> None:
    snapshot = activations_snapshot(n=10)
    per_row = LAYERS * POSITIONS * D_MODEL * 2 * 2  # two float16 arrays
    export_snapshot(snapshot, tmp_path / "out", max_shard_size=3 * per_row)
    shards = sorted((tmp_path / "out" / "activations").glob("train-*.parquet"))
    assert len(shards) == hub.num_shards(snapshot.dataset, 3 * per_row) >= 4
    assert shards[-1].name == f"train-{len(shards) - 1:05d}-of-{len(shards):05d}.parquet"
    assert_same_rows(
        load_exported(tmp_path / "out", "activations", tmp_path / "c"), snapshot.dataset
    )


def test_reexport_replaces_the_stage_and_keeps_the_others(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    export_snapshot(programs_snapshot(), folder)
    export_snapshot(activations_snapshot(n=8), folder, max_shard_size=1)
    smaller = activations_snapshot(n=3, seed=5)
    export_snapshot(smaller, folder)
    assert len(list((folder / "activations").glob("*.parquet"))) == 1
    assert_same_rows(load_exported(folder, "activations", tmp_path / "c"), smaller.dataset)
    assert_same_rows(load_exported(folder, "programs", tmp_path / "c"), programs_snapshot().dataset)
    assert not list(folder.glob(".seqpatch-export-*"))


# ---------------------------------------------------------------------------------------------
# Cards


def test_card_lists_every_config_and_shows_real_statistics(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    for snapshot in (
        patching_snapshot(tmp_path),
        programs_snapshot(),
        benchmark_snapshot(),
        pairs_snapshot(),
    ):
        export_snapshot(snapshot, folder, repo_id="alice/study")
    card = DatasetCard.load(folder / "README.md")
    names = [c["config_name"] for c in card.data.configs]
    assert names == ["programs", "benchmark", "pairs", "patching"]  # pipeline order
    assert card.data.license and "seqpatch" in card.data.tags
    assert card.data.task_categories == ["text-generation"]
    assert card.data.size_categories == ["n<1K"]
    infos = {i["config_name"]: i for i in card.data.dataset_info}
    assert infos["programs"]["splits"][0]["num_examples"] == 12
    text = card.text
    assert text.count("<!-- seqpatch-stage:") == 4
    assert "| arithmetic | 6 |" in text and "| binding | 6 |" in text  # families
    assert "| `m-a` | 4 | 75.0% |" in text and "| `m-b` | 4 | 25.0% |" in text  # accuracy
    assert "In 80.0% of the pairs" in text
    assert "![heatmap.png](patching/heatmap.png)" in text
    assert (
        f"| `patching/heatmap_prob_delta.npy` | prob_delta: Δ P(B) | 2 × 1 × 3 × {LAYERS} × {POSITIONS} |"
        in text
    )
    assert "| `patching/heatmap.npy` | prob_delta (mean only" in text  # the roadmap's array
    assert f"| 2 × 1 × {LAYERS} × {POSITIONS} |" in text
    assert "`mlp_out`, `resid_pre`" in text  # patching sites
    assert 'load_dataset("alice/study", "pairs", split="train")' in text
    assert '"seed": 0' in text and "0.1.0" in text  # config and seqpatch version


def test_card_warns_when_a_stage_was_built_from_another_parent_version(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    export_snapshot(pairs_snapshot(), folder)  # version pairs-v1
    export_snapshot(activations_snapshot(), folder)  # parent_version pairs-v1: consistent
    assert "Lineage mismatch" not in (folder / "README.md").read_text()
    other = pairs_snapshot()
    other = StageSnapshot("pairs", other.dataset, {**other.provenance, "version": "pairs-v2"})
    export_snapshot(other, folder)
    text = (folder / "README.md").read_text()
    assert "Lineage mismatch" in text and "`pairs` version `pairs-v1`" in text


def test_card_degrades_gracefully_without_optional_statistics(tmp_path: Path) -> None:
    bare = StageSnapshot("somestage", Dataset.from_dict({"value": [1, 2, 3]}), {})
    export_snapshot(bare, tmp_path / "out")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["somestage"]
    assert "3 rows." in card.text and "Undefined" not in card.text
    assert_same_rows(load_exported(tmp_path / "out", "somestage", tmp_path / "c"), bare.dataset)


def test_empty_stage_is_refused_and_leaves_the_folder_untouched(tmp_path: Path) -> None:
    export_snapshot(programs_snapshot(), tmp_path / "study")
    before = (tmp_path / "study" / "README.md").read_text()
    empty = StageSnapshot("pairs", pairs_snapshot().dataset.select([]), {})
    with pytest.raises(HubError, match="no rows"):
        export_snapshot(empty, tmp_path / "study")
    assert (tmp_path / "study" / "README.md").read_text() == before
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["README.md", "programs"]


def test_hand_written_card_metadata_survives_a_merge(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    mine = "---\nlicense: mit\ntags:\n- mine\n---\n# hello\n"
    (folder / "README.md").write_text(mine)
    with pytest.raises(HubError, match="not a seqpatch export"):
        export_snapshot(programs_snapshot(), folder)
    assert (folder / "README.md").read_text() == mine
    exported = export_snapshot(programs_snapshot(), folder, force=True)
    card = DatasetCard.load(folder / "README.md")
    assert card.data.license == "mit"
    assert {"mine", "seqpatch"} <= set(card.data.tags)
    assert (folder / "README.before-seqpatch.md").read_text() == mine  # kept, not deleted
    assert any("README.before-seqpatch.md" in note for note in exported.notes)


# ---------------------------------------------------------------------------------------------
# Push (fake Hub)


def _bind(method: str, *args: Any, **kwargs: Any) -> None:
    """Fail if a call would not fit the real ``HfApi`` method's signature."""
    inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)


def _http_error(status: int, method: str = "POST") -> HfHubHTTPError:
    request = httpx.Request(method, "https://huggingface.co/api/datasets/alice/study")
    message = f"{status} Client Error for url {request.url} (token {TOKEN})"
    return HfHubHTTPError(message, response=httpx.Response(status, request=request))


class FakeHub:
    """Stands in for ``HfApi``: the repo is a folder, commits apply their operations to it.

    ``head`` is the repo's commit counter: a commit must name it as ``parent_commit``.
    """

    instances: ClassVar[list[FakeHub]] = []
    calls: ClassVar[list[str]] = []
    fail_with: ClassVar[Exception | None] = None
    head: ClassVar[int] = 0

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root, self.token = root, token
        self.commits: list[list[Any]] = []
        self.repos: list[tuple[str, bool]] = []
        FakeHub.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        FakeHub.calls.append("create_repo")
        _bind("create_repo", repo_id, **kwargs)
        assert kwargs["repo_type"] == "dataset" and kwargs["exist_ok"]
        if FakeHub.fail_with is not None:
            raise FakeHub.fail_with
        self.repos.append((repo_id, kwargs["private"]))
        self.root.mkdir(parents=True, exist_ok=True)

    def dataset_info(self, repo_id: str, **kwargs: Any) -> Any:
        FakeHub.calls.append("dataset_info")
        _bind("dataset_info", repo_id, **kwargs)
        return type("Info", (), {"sha": f"{FakeHub.head:040x}"})()

    def list_repo_files(self, repo_id: str, **kwargs: Any) -> list[str]:
        FakeHub.calls.append("list_repo_files")
        _bind("list_repo_files", repo_id, **kwargs)
        files = (p for p in self.root.rglob("*") if p.is_file())
        return sorted(p.relative_to(self.root).as_posix() for p in files)

    def hf_hub_download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        FakeHub.calls.append("hf_hub_download")
        _bind("hf_hub_download", repo_id, filename, **kwargs)
        path = self.root / filename
        if not path.is_file():
            request = httpx.Request("GET", f"https://huggingface.co/{repo_id}/{filename}")
            raise RemoteEntryNotFoundError("404", response=httpx.Response(404, request=request))
        return str(path)

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> Any:
        FakeHub.calls.append("create_commit")
        _bind("create_commit", repo_id, operations, **kwargs)
        if kwargs.get("parent_commit") != f"{FakeHub.head:040x}":
            raise _http_error(412)
        FakeHub.head += 1
        operations = list(operations)
        self.commits.append(operations)
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                (self.root / op.path_in_repo).unlink()
            else:
                target = self.root / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(op.path_or_fileobj, target)
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    remote = tmp_path / "remote"
    FakeHub.instances, FakeHub.calls, FakeHub.fail_with, FakeHub.head = [], [], None, 0
    monkeypatch.setattr(hub.push, "HfApi", lambda token=None: FakeHub(remote, token))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(redact, "saved_login", lambda: None)
    return remote


def test_push_is_one_commit_with_every_file_and_merges_the_card(
    fake_hub: Path, tmp_path: Path
) -> None:
    url = push_snapshot(pairs_snapshot(), "alice/study", token=TOKEN, private=True)
    assert url.endswith("/commit/1")
    first = FakeHub.instances[-1]
    assert first.repos == [("alice/study", True)]
    assert len(first.commits) == 1
    assert sorted(op.path_in_repo for op in first.commits[0]) == [
        "README.md",
        "pairs/seqpatch.json",
        "pairs/train-00000-of-00001.parquet",
    ]
    assert all(isinstance(op, CommitOperationAdd) for op in first.commits[0])

    push_snapshot(activations_snapshot(n=8), "alice/study", token=TOKEN, max_shard_size=1)
    push_snapshot(activations_snapshot(n=2), "alice/study", token=TOKEN)
    last = FakeHub.instances[-1]
    assert len(last.commits) == 1
    deleted = [op.path_in_repo for op in last.commits[0] if isinstance(op, CommitOperationDelete)]
    assert deleted == [f"activations/train-{i:05d}-of-00008.parquet" for i in range(8)]

    card = DatasetCard.load(fake_hub / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["pairs", "activations"]
    assert_same_rows(load_exported(fake_hub, "pairs", tmp_path / "c"), pairs_snapshot().dataset)
    assert_same_rows(
        load_exported(fake_hub, "activations", tmp_path / "c"), activations_snapshot(n=2).dataset
    )


def test_token_never_reaches_a_published_or_exported_file(
    fake_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_snapshot(patching_snapshot(tmp_path), "alice/study")
    assert FakeHub.instances[-1].token == TOKEN  # the env token was used…
    export_snapshot(pairs_snapshot(), tmp_path / "export")
    for path in [*fake_hub.rglob("*"), *(tmp_path / "export").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path  # …and written nowhere


def test_provenance_carrying_the_token_is_refused_before_any_commit(fake_hub: Path) -> None:
    leaky = pairs_snapshot()
    leaky = StageSnapshot("pairs", leaky.dataset, {**leaky.provenance, "config": {"t": TOKEN}})
    with pytest.raises(HubError, match="would contain your Hugging Face token") as info:
        push_snapshot(leaky, "alice/study", token=TOKEN)
    assert TOKEN not in str(info.value)
    assert FakeHub.calls == []  # refused before the first Hub call (no create_repo)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_http_error(401), "refused the token \\(HTTP 401\\)"),
        (_http_error(403), "refused the token \\(HTTP 403\\)"),
        (_http_error(500), "the Hub answered 500"),
        (httpx.ConnectError("no route"), "the Hub is unreachable \\(ConnectError\\)"),
    ],
)
def test_hub_failures_become_one_clear_error_and_nothing_is_committed(
    fake_hub: Path, error: Exception, expected: str
) -> None:
    FakeHub.fail_with = error
    with pytest.raises(HubError, match=expected) as info:
        push_snapshot(pairs_snapshot(), "alice/study", token=TOKEN)
    assert TOKEN not in str(info.value)
    assert FakeHub.instances[-1].commits == []


def test_a_concurrent_push_makes_the_commit_fail_cleanly(
    fake_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_list = FakeHub.list_repo_files

    def list_then_someone_pushes(self: FakeHub, repo_id: str, **kwargs: Any) -> list[str]:
        FakeHub.head += 1
        return real_list(self, repo_id, **kwargs)

    monkeypatch.setattr(FakeHub, "list_repo_files", list_then_someone_pushes)
    with pytest.raises(HubError, match="changed while publishing"):
        push_snapshot(pairs_snapshot(), "alice/study", token=TOKEN)
    assert FakeHub.instances[-1].commits == []
    assert not (fake_hub / "README.md").exists()


def test_push_without_any_token_says_how_to_log_in(fake_hub: Path) -> None:
    with pytest.raises(HubError, match="HF_TOKEN"):
        push_snapshot(pairs_snapshot(), "alice/study")
    assert FakeHub.instances == []


def test_bad_repo_id_is_rejected(fake_hub: Path) -> None:
    with pytest.raises(HubError, match="USER/NAME"):
        push_snapshot(pairs_snapshot(), "not a repo", token=TOKEN)


# ---------------------------------------------------------------------------------------------
# Continue from a published stage


def test_resolve_parent_from_folder_returns_rows_and_provenance(tmp_path: Path) -> None:
    snapshot = activations_snapshot()
    export_snapshot(snapshot, tmp_path / "study")
    dataset, provenance = resolve_parent(
        tmp_path / "study", "activations", cache_dir=tmp_path / "c"
    )
    assert_same_rows(dataset, snapshot.dataset)
    assert provenance["version"] == "act-v1"
    assert provenance["published_source"] == {
        "kind": "folder",
        "source": str((tmp_path / "study").resolve()),
        "stage": "activations",
    }


def test_resolve_parent_from_fake_hub_records_the_revision(
    fake_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_snapshot(pairs_snapshot(), "alice/study", token=TOKEN)
    calls = []

    def fake_load(path: str, name: str, **kwargs: Any) -> Dataset:
        calls.append((path, name, kwargs["revision"]))
        return load_dataset(str(fake_hub), name, split=kwargs["split"], cache_dir=str(tmp_path))

    monkeypatch.setattr(hub.importing, "load_dataset", fake_load)
    dataset, provenance = resolve_parent("alice/study", "pairs")
    head = f"{FakeHub.head:040x}"
    assert calls == [("alice/study", "pairs", head)]
    assert dataset.num_rows == 5
    assert provenance["published_source"]["revision"] == head


def test_resolve_parent_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(HubError, match="neither an existing folder nor a Hub repo id"):
        resolve_parent(str(tmp_path / "missing" / "deep"), "pairs")
    export_snapshot(activations_snapshot(), tmp_path / "study")
    with pytest.raises(HubError, match="no exported stage 'pairs'"):
        resolve_parent(tmp_path / "study", "pairs")
    provenance_path = tmp_path / "study" / "activations" / "seqpatch.json"
    provenance = json.loads(provenance_path.read_text())
    provenance_path.write_text(json.dumps({**provenance, "row_count": 99}))
    with pytest.raises(HubError, match="incomplete or mixed"):
        resolve_parent(tmp_path / "study", "activations", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# With the real store and the programs stage


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """A data dir holding a real programs stage and a patching-like stage with a chart."""
    from seqpatch.executor import execute as build_stage
    from seqpatch.stages.base import Built
    from seqpatch.stages.programs import ProgramsConfig
    from seqpatch.store import Store

    data_dir = tmp_path / "data"
    programs = build_stage(
        "programs", ProgramsConfig("arithmetic", (1, 3), 4, 0), data_dir=data_dir
    )
    patching = patching_snapshot(tmp_path)
    files = {p.name: p.read_bytes() for p in patching.artifacts}
    files["heatmap.html"] = "<html></html>"
    Store(data_dir).get_or_build(
        "patching",
        1,
        {"sites": ["resid_pre"]},
        lambda: Built(patching.dataset, artifacts=files),
        parents=[programs],
    )
    return data_dir


def test_export_stage_from_the_store_matches_store_load(stored: Path, tmp_path: Path) -> None:
    from seqpatch.store import Store

    store = Store(stored)
    for stage in ("programs", "patching"):
        hub.export_stage(stage, tmp_path / "study", data_dir=stored, repo_id="alice/study")
        loaded = load_exported(tmp_path / "study", stage, tmp_path / "c")
        assert_same_rows(loaded, store.load(stage))
    published = json.loads((tmp_path / "study" / "programs" / "seqpatch.json").read_text())
    assert published == dict(store.resolve("programs").provenance)
    text = (tmp_path / "study" / "README.md").read_text()
    assert "| arithmetic | 8 |" in text and "| 1 | 4 |" in text and "| 3 | 4 |" in text
    assert "![heatmap.png](patching/heatmap.png)" in text
    assert (tmp_path / "study" / "patching" / "heatmap_prob_delta.npy").is_file()
    assert not (tmp_path / "study" / "patching" / "heatmap.html").exists()


def test_import_stage_reproduces_the_version_and_records_the_source(
    stored: Path, tmp_path: Path
) -> None:
    from seqpatch.store import Store

    original = Store(stored).resolve("programs")
    hub.export_stage("programs", tmp_path / "study", data_dir=stored)
    ref = hub.import_stage(
        tmp_path / "study", "programs", tmp_path / "other", cache_dir=tmp_path / "c"
    )
    assert ref.version == original.version and not ref.reused
    imported = ref.provenance["extra"]["imported_from"]
    assert imported["kind"] == "folder" and imported["version"] == original.version
    assert ref.provenance["config"] == original.provenance["config"]
    assert_same_rows(Store(tmp_path / "other").load("programs"), Store(stored).load("programs"))


def test_a_resolved_parent_is_recorded_with_its_source_by_the_store(
    stored: Path, tmp_path: Path
) -> None:
    from seqpatch.store import Store

    hub.export_stage("programs", tmp_path / "study", data_dir=stored)
    rows, provenance = resolve_parent(tmp_path / "study", "programs", cache_dir=tmp_path / "c")
    ref = Store(tmp_path / "other").get_or_build(
        "benchmark", 1, {"models": ["builtin"]}, lambda: rows.select(range(2)), parents=[provenance]
    )
    (parent,) = ref.provenance["parents"]
    assert parent["version"] == Store(stored).resolve("programs").version
    assert parent["source"]["kind"] == "folder"


def test_push_stage_from_the_store(stored: Path, fake_hub: Path, tmp_path: Path) -> None:
    hub.push_stage("patching", "alice/study", data_dir=stored, token=TOKEN)
    (commit,) = FakeHub.instances[-1].commits
    assert "patching/heatmap.png" in {op.path_in_repo for op in commit}
    assert load_exported(fake_hub, "patching", tmp_path / "c").num_rows == 4


def test_cli_export_and_push_errors(stored: Path, fake_hub: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from seqpatch.cli import app

    runner = CliRunner()
    folder = tmp_path / "cli-study"
    result = runner.invoke(
        app, ["export", "programs", "--to", str(folder), "--data-dir", str(stored)]
    )
    assert result.exit_code == 0, result.output
    assert load_exported(folder, "programs", tmp_path / "c").num_rows == 8
    result = runner.invoke(
        app, ["push", "programs", "--repo-id", "alice/x", "--data-dir", str(stored)]
    )
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error: no Hugging Face token")
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["export", "pairs", "--to", str(folder), "--data-dir", str(stored)])
    assert result.exit_code == 2 and "no stored 'pairs' stage" in result.output


def test_pairs_card_shows_every_rejection_reason_the_stage_stores(tmp_path: Path) -> None:
    """The provenance is the one the pairs stage writes (its own ``_rejections``), committed by
    the store: the card must show each of the stage's reasons with its count."""
    from seqpatch.pairs import RejectionCounts
    from seqpatch.stages import pairs as pairs_stage
    from seqpatch.stages.base import Built
    from seqpatch.store import Store

    model_counts = {r: 11 + i for i, r in enumerate(pairs_stage.MODEL_REJECTIONS)}
    counts = RejectionCounts(drawn=90, token_length=7, equal_answers=3)
    stats = {
        "candidates": 60,
        "accepted": 5,
        "rejections": pairs_stage._rejections(counts, model_counts, 4),
        "model": {"id": "builtin"},
    }
    rows = pairs_snapshot().dataset
    Store(tmp_path / "data").get_or_build(
        "pairs", pairs_stage.SCHEMA_VERSION, {"seed": 0}, lambda: Built(rows, stats)
    )
    snapshot = hub.snapshot_from_store("pairs", data_dir=tmp_path / "data")
    export_snapshot(snapshot, tmp_path / "study")
    text = (tmp_path / "study" / "README.md").read_text()
    assert "60 candidate pairs were drawn to keep these 5" in text
    stored = snapshot.provenance["extra"]["rejections"]
    assert set(pairs_stage.REJECTIONS) <= set(stored)
    for reason in pairs_stage.REJECTIONS:
        assert f"| {reason} | {stored[reason]} |" in text, reason
    assert "of 90 changes drawn" in text
