"""The Hugging Face token never appears (issue 27 item 3).

With ``HF_TOKEN`` set to a fake token, a tiny study is run through every command that takes a
path, a model or a string — the model folder, the data dir, the output folders and config
values all carry the token — and every line printed and every byte of every file written is
searched for it. The token may only ever show as ``seqpatch.redact.MARKER``.

The organism's shipped weights are copied into a folder whose path holds the token (read in
its compact format, on its own binding family), so the study is real and small.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqpatch.cli import app
from seqpatch.errors import SeqpatchError
from seqpatch.redact import MARKER, redact_rows, restore
from seqpatch.store import Store

TOKEN = "hf_FakeTokenGuard0123456789abcdefXYZ"
WEIGHTS = Path(__file__).resolve().parents[1] / "seqpatch" / "organism" / "weights"

runner = CliRunner()


class Study:
    """Where the study lives and everything its commands printed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = root / "models" / TOKEN / "organism"
        self.data = root / f"data-{TOKEN}"
        self.out = root / f"out-{TOKEN}"
        self.outputs: list[tuple[list[str], int, str]] = []

    def run(self, *args: object, ok: bool = True) -> str:
        argv = [str(a) for a in args]
        result = runner.invoke(app, argv)
        text = result.stdout + result.stderr
        self.outputs.append((argv, result.exit_code, text))
        if ok:
            assert result.exit_code == 0, (argv, text)
        else:
            assert result.exit_code == 2, (argv, text)
        return text


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("token")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", TOKEN)
    mp.setenv("SEQPATCH_CACHE", str(root / f"cache-{TOKEN}"))
    try:
        s = Study(root)
        shutil.copytree(WEIGHTS, s.model)
        spec = f"{s.model}:compact"
        d = ("--data-dir", s.data)
        s.run("build", "programs", "--family", "binding", "--seq-lens", "2-3", "--n-per-len", 4, *d)
        s.run("build", "benchmark", "--models", spec, *d)
        s.run("choose", "--min-accuracy", "0", "--min-seq-len", "2", *d)
        s.run("build", "pairs", "--model", "chosen", "--n-pairs", "6", "--divergence-index", 0, *d)
        s.run("build", "activations", "--sites", "resid_pre", *d)
        s.run("build", "patching", "--sites", "resid_pre", *d)
        s.run("build", "tracing", "--n-programs", 1, "--n-samples", 2, *d)
        s.run("build", "das", "--top-n", 1, "--ks", 1, "--epochs", 1, "--allow-small", *d)
        sharded = ("build", "patching", "--sites", "resid_post", "--shard-size", 3)
        s.run(*sharded, "--shard", "0/2", *d)  # shards wait in a work folder of the data dir
        s.run(*sharded, "--shard", "1/2", *d)
        s.run("merge", "patching", *d)
        for chart in ("accuracy", "heatmap", "traces", "tracing"):
            s.run("plot", chart, "--out", s.out, *d)
        s.run("list", *d)
        s.run("verify", *d)
        s.run("models", "list")
        # a stage whose own rows and provenance are free of the token exports; one whose model
        # path held it is refused (a published copy must be the stored one)
        s.run("export", "programs", "--to", s.out / "export", *d)
        s.run("export", "pairs", "--to", s.out / "refused", *d, ok=False)
        # an import whose published model id holds the token
        published = s.out / "export" / "programs" / "seqpatch.json"
        provenance = json.loads(published.read_text())
        provenance["model"] = {"id": f"/models/{TOKEN}/llama", "revision": None}
        published.write_text(json.dumps(provenance))
        s.run("import", "programs", "--from", s.out / "export", "--data-dir", s.root / "imported")
        published.unlink()  # the edited copy is the test's own file, not seqpatch's
        # errors whose message would echo the token
        s.run("build", "programs", "--family", TOKEN, *d, ok=False)
        s.run("build", "pairs", "--model", s.root / TOKEN / "missing", *d, ok=False)
        s.run("verify", TOKEN, *d, ok=False)
        s.run("build", TOKEN, ok=False)
        s.run("plot", "heatmap", "--metric", TOKEN, *d, ok=False)
        s.run("list", "--data-dir", s.root / TOKEN / "nothing-here")
        organism = ("organism", "train", "--steps", 1, "--out")
        s.run(*organism, s.root / TOKEN / "org", "--lr", TOKEN, ok=False)
        foreign = s.root / TOKEN / "notes"
        foreign.mkdir(parents=True)
        (foreign / "README.md").write_text("mine\n")
        s.run(*organism, foreign, ok=False)  # a folder it did not write, named in the error
    finally:
        mp.undo()
    return s


def test_no_output_of_any_command_shows_the_token(study: Study) -> None:
    assert len(study.outputs) >= 25
    for argv, code, text in study.outputs:
        assert TOKEN not in text, (argv, code, text)
    printed = "\n".join(text for _, _, text in study.outputs)
    assert MARKER in printed  # the paths were shown, with the marker in the token's place
    assert "Traceback" not in printed


def test_no_file_written_holds_the_token(study: Study) -> None:
    files = [p for p in study.root.rglob("*") if p.is_file()]
    written = [p for p in files if study.model not in p.parents]
    assert len(written) > 50 and any(p.suffix == ".arrow" for p in written)
    leaks = [p for p in written if TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    names = [p for p in study.root.rglob("*") if TOKEN in p.name and p != study.model.parent]
    assert all(p.name.endswith(TOKEN) for p in names)  # only the folders the test named so


def test_provenance_rows_csv_and_html_carry_the_marker(study: Study) -> None:
    benchmark = study.data / "benchmark"
    (version,) = [p for p in benchmark.iterdir() if not p.name.startswith(".")]
    stored = json.loads((version / "seqpatch.json").read_text())
    assert MARKER in stored["config"]["models"][0]
    assert MARKER in (version / "results_summary.csv").read_text()
    assert MARKER in (study.out / "accuracy.html").read_text()  # drawn by plot accuracy
    chosen = json.loads((study.data / "chosen_model.json").read_text())
    assert MARKER in chosen["model_spec"]
    imported = Store(study.root / "imported").resolve("programs")
    raw = json.loads((imported.path / "seqpatch.json").read_text())
    assert raw["model"]["id"] == f"/models/{MARKER}/llama"


def test_what_is_read_back_is_the_real_value_so_children_find_the_model(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pairs = Store(study.data).resolve("pairs")
    assert pairs.provenance["config"]["model"] == f"{study.model}:compact"
    rows = Store(study.data).load("benchmark")
    assert set(rows["model_spec"]) == {f"{study.model}:compact"}


def test_the_version_does_not_depend_on_whether_the_token_is_set(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version is a hash of the values as given: the same command without the token set
    reuses what was built with it (and the other way round)."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("seqpatch.redact.saved_login", lambda: None)
    result = runner.invoke(
        app,
        ["build", "benchmark", "--models", f"{study.model}:compact", "--data-dir", str(study.data)],
    )
    assert result.exit_code == 0, result.output
    assert "reused benchmark" in result.output
    # the chosen model's path was stored with the marker: without the token it cannot be found
    result = runner.invoke(
        app,
        ["build", "pairs", "--model", "chosen", "--n-pairs", "6", "--data-dir", str(study.data)],
    )
    assert result.exit_code == 2, result.output
    assert "set HF_TOKEN again" in result.stderr


def test_python_errors_and_values_are_redacted_at_one_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert str(SeqpatchError(f"no folder /x/{TOKEN}/y")) == f"no folder /x/{MARKER}/y"
    assert restore({"id": f"/x/{MARKER}"}) == {"id": f"/x/{TOKEN}"}
    from datasets import Dataset

    rows = Dataset.from_dict({"m": [f"a{TOKEN}", "b"], "l": [[TOKEN], []], "n": [1, 2]})
    assert redact_rows(rows).to_dict() == {
        "m": [f"a{MARKER}", "b"],
        "l": [[MARKER], []],
        "n": [1, 2],
    }
    monkeypatch.setenv("HF_TOKEN", "short")  # not a credential: nothing is replaced
    assert str(SeqpatchError("a short story")) == "a short story"


def test_a_chart_is_drawn_from_a_redacted_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """PNG labels are pixels: the spec is redacted before rendering, not only the file after."""
    import altair as alt
    import polars as pl

    from seqpatch.redact import redact_chart

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    data = pl.DataFrame({"model": [f"/m/{TOKEN}/a"], "x": [1]})
    chart = alt.Chart(data).mark_point().encode(x="x", color="model").properties(title=TOKEN)
    layered = alt.layer(chart, chart)
    for drawn in (redact_chart(chart), redact_chart(layered)):
        spec = json.dumps(drawn.to_dict())
        assert TOKEN not in spec and MARKER in spec
    assert redact_chart(chart).to_dict()["mark"]["type"] == "point"  # the same chart otherwise
    assert isinstance(redact_chart(layered), alt.LayerChart)


def test_a_login_this_user_cannot_read_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A colleague reading a shared store under another uid cannot stat root's login file:
    redaction must not turn that into a PermissionError on every command."""
    from seqpatch import redact

    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(Path, "is_file", denied)
    assert redact.secret() is None
    assert str(SeqpatchError("plain")) == "plain"
