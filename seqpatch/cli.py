"""The ``seqpatch`` command line: a thin layer that parses options and calls library functions.

Layout (add a command by decorating a function with the matching sub-app)::

    seqpatch build <stage>      build_app      one pipeline stage into the store
    seqpatch list               app            stored stage versions
    seqpatch organism ...       organism_app   the built-in model
    seqpatch plot ...           plot_app       charts read from stored stages
    seqpatch run / choose / push / export      app

Every ``SeqpatchError`` raised by any command becomes one line on stderr and exit code 2 (see
``SeqpatchGroup``). Heavy libraries (datasets, torch, transformers) are imported inside commands
so that ``seqpatch --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from seqpatch.errors import SeqpatchError

USER_ERROR_EXIT_CODE = 2


class SeqpatchGroup(TyperGroup):
    """The root command group: turns a ``SeqpatchError`` from any sub-command into one line."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SeqpatchError as err:
            message = " ".join(str(err).split())
            typer.echo(f"Error: {message}", err=True)
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None


def examples(*commands: str) -> str:
    """An epilog listing example commands (shown at the end of ``--help``)."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {c}" for c in commands)


app = typer.Typer(
    cls=SeqpatchGroup,
    name="seqpatch",
    help="Find where and how a language model tracks the values of variables.",
    epilog=examples(
        "seqpatch run                      # the whole pipeline on the built-in model",
        "seqpatch build pairs --model builtin --seq-len 8 --n-pairs 2000",
        "seqpatch build patching --sites resid_pre,mlp_out",
        "seqpatch list",
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
build_app = typer.Typer(
    help="Build one pipeline stage into the store (reuses a stored version with the same config).",
    no_args_is_help=True,
)
organism_app = typer.Typer(help="The built-in model: train it, inspect it.", no_args_is_help=True)
plot_app = typer.Typer(help="Charts read from stored stages.", no_args_is_help=True)
app.add_typer(build_app, name="build")
app.add_typer(organism_app, name="organism")
app.add_typer(plot_app, name="plot")


# ---------------------------------------------------------------------------------------------
# Shared options

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder of the versioned store \\[default: $SEQPATCH_DATA or ./seqpatch-data].",
        show_default=False,
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random choice.")]
FamilyOpt = Annotated[
    str,
    typer.Option("--family", help="Program family: arithmetic, binding or modular."),
]
RemoteOpt = Annotated[
    bool,
    typer.Option(
        "--remote",
        help="Run the model's forward passes on NDIF's hosted copy through nnsight "
        "(remote=True) instead of here. Needs NDIF_API_KEY and the network; Hub ids only "
        "(not builtin or a local folder). Same version as a local run.",
    ),
]


# ---------------------------------------------------------------------------------------------
# build


@build_app.command(
    "programs",
    epilog=examples(
        "seqpatch build programs --family arithmetic --seq-lens 1-10 --n-per-len 200 --seed 0",
        "seqpatch build programs --family binding --seq-lens 3,5,8 --n-per-len 50",
        "seqpatch build programs --family modular --seq-lens 1-4,8 --data-dir /tmp/sp",
    ),
)
def build_programs(
    family: FamilyOpt = "arithmetic",
    seq_lens: Annotated[
        str, typer.Option("--seq-lens", help="Lengths: a range 1-10, a list 3,5,8, or 1-4,8.")
    ] = "1-10",
    n_per_len: Annotated[
        int, typer.Option("--n-per-len", help="Programs sampled per length.")
    ] = 200,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
) -> None:
    """Sample programs of one family: the task rows every later stage starts from."""
    from seqpatch.stages import build_stage
    from seqpatch.stages.programs import ProgramsConfig, parse_seq_lens

    cfg = ProgramsConfig(family, parse_seq_lens(seq_lens), n_per_len, seed)
    ref = build_stage("programs", cfg, data_dir=data_dir)
    _report(ref)


@build_app.command(
    "pairs",
    epilog=examples(
        "seqpatch build pairs --model builtin --seq-len 8 --divergence-index all --n-pairs 2000",
        "seqpatch build pairs --model chosen --seq-len 6 --divergence-index 2 --n-pairs 500",
        "seqpatch build pairs --model ./my-model --family binding --seq-len 5 --allow-equal-answers",
    ),
)
def build_pairs(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="builtin, chosen (reads chosen_model.json), a local folder or a Hub id.",
        ),
    ] = "builtin",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Statements per program.")] = 8,
    divergence_index: Annotated[
        str,
        typer.Option(
            "--divergence-index",
            help="Statement changed between A and B: 'all' (balanced), '3' or '0,2,5'.",
        ),
    ] = "all",
    n_pairs: Annotated[int, typer.Option("--n-pairs", help="Pairs to keep.")] = 2000,
    family: Annotated[
        str | None,
        typer.Option(
            "--family",
            help="Program family \\[default: the organism's own for builtin, else binding].",
            show_default=False,
        ),
    ] = None,
    allow_equal_answers: Annotated[
        bool,
        typer.Option("--allow-equal-answers", help="Also keep pairs whose two answers are equal."),
    ] = False,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
) -> None:
    """Counterfactual pairs (A, B) differing in one statement, both answered correctly.

    Token lengths of A and B are verified equal under the model's tokenizer; rejected
    candidates are counted by reason and stored in the stage's provenance.
    """
    from seqpatch.stages.pairs import build_pairs as build_pairs_stage

    ref = build_pairs_stage(
        model, seq_len, divergence_index, n_pairs, seed, family, allow_equal_answers, data_dir
    )
    _report(ref)
    extra = ref.provenance.get("extra", {})
    if "rejections" in extra:
        typer.echo(
            f"candidates {extra['candidates']}, accepted {extra['accepted']}; rejections: "
            + ", ".join(f"{k}={v}" for k, v in extra["rejections"].items())
        )


def _report(ref: Any) -> None:
    action = "reused" if ref.reused else "built"
    rows = ref.provenance.get("row_count")
    typer.echo(f"{action} {ref.stage} version {ref.version} ({rows} rows): {ref.path}")


# ---------------------------------------------------------------------------------------------
# benchmark, choose, plot accuracy (seqpatch.stages.benchmark, seqpatch.choose)

BenchmarkVersionOpt = Annotated[
    str, typer.Option("--benchmark", help="Stored benchmark version (or a prefix), or 'latest'.")
]


@build_app.command(
    "benchmark",
    epilog=examples(
        "seqpatch build benchmark --models builtin",
        "seqpatch build benchmark --models builtin,Qwen/Qwen2.5-0.5B --batch-size 32",
        "seqpatch build benchmark --models ./my-model:compact --programs 3f2a --data-dir /tmp/sp",
        "NDIF_API_KEY=... seqpatch build benchmark --models meta-llama/Llama-3.1-8B --remote",
    ),
)
def build_benchmark(
    models: Annotated[
        str,
        typer.Option(
            "--models",
            help="Comma-separated: builtin, local folders, Hub ids; add :compact, :code or "
            ":code-chat to choose a model's prompt format.",
        ),
    ] = "builtin",
    programs: Annotated[
        str, typer.Option("--programs", help="Programs version (or a prefix), or 'latest'.")
    ] = "latest",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per forward.")] = 64,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest greedy continuation, in tokens.")
    ] = 8,
    remote: RemoteOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Run each model on each program: greedy answer, answer log-prob and rank.

    Writes results_summary.csv and accuracy.html/.png into the version folder. Resumes model by
    model after an interruption.
    """
    from seqpatch.stages.benchmark import (
        BenchmarkConfig,
        parse_models,
        write_accuracy_chart,
        write_summary,
    )
    from seqpatch.stages.benchmark import build_benchmark as build

    cfg = BenchmarkConfig(parse_models(models), batch_size, max_new_tokens)
    ref = build(cfg, programs=programs, data_dir=data_dir, remote=remote)
    _report(ref)
    typer.echo(f"summary: {write_summary(ref)}")
    for path in write_accuracy_chart(ref):
        typer.echo(f"chart: {path}")


@app.command(
    "choose",
    epilog=examples(
        "seqpatch choose --min-accuracy 0.8 --min-seq-len 6",
        "seqpatch choose --min-accuracy 0.9 --min-seq-len 4 --benchmark 3f2a --data-dir /tmp/sp",
    ),
)
def choose(
    min_accuracy: Annotated[
        float, typer.Option("--min-accuracy", help="Accuracy the model must reach (0-1).")
    ] = 0.8,
    min_seq_len: Annotated[
        int, typer.Option("--min-seq-len", help="Shortest program length that counts.")
    ] = 6,
    benchmark: BenchmarkVersionOpt = "latest",
    data_dir: DataDirOpt = None,
) -> None:
    """Pick the smallest model reaching the accuracy, and its longest such length.

    Writes <data_dir>/chosen_model.json.
    """
    from seqpatch.choose import choose as choose_from_store

    choice, path = choose_from_store(min_accuracy, min_seq_len, benchmark, data_dir)
    typer.echo(
        f"chose {choice.model_spec} ({choice.n_params:,} parameters) at seq_len "
        f"{choice.seq_len}: accuracy {choice.accuracy:.3f} "
        f"[{choice.ci_low:.3f}, {choice.ci_high:.3f}], n={choice.n}: {path}"
    )


@plot_app.command(
    "accuracy",
    epilog=examples(
        "seqpatch plot accuracy",
        "seqpatch plot accuracy --benchmark 3f2a --out ./figures",
    ),
)
def plot_accuracy(
    benchmark: BenchmarkVersionOpt = "latest",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder for accuracy.html/.png \\[default: the version folder]."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Redraw accuracy by program length (Wilson 95% intervals) from a stored benchmark."""
    from seqpatch.stages.benchmark import STAGE, write_accuracy_chart
    from seqpatch.store import Store

    ref = Store(data_dir).resolve(STAGE, benchmark)
    for path in write_accuracy_chart(ref, out):
        typer.echo(f"chart: {path}")


# ---------------------------------------------------------------------------------------------
# activations / patching / merge / plot heatmap|traces / run (seqpatch.pipeline)

SitesOpt = Annotated[
    str,
    typer.Option(
        "--sites", help="Comma-separated sites: resid_pre, resid_post, attn_out, mlp_out."
    ),
]
PairsVersionOpt = Annotated[
    str, typer.Option("--pairs", help="Pairs version (or unique prefix), or 'latest'.")
]
PatchingVersionOpt = Annotated[
    str, typer.Option("--patching", help="Patching version (or unique prefix), or 'latest'.")
]
MetricOpt = Annotated[str, typer.Option("--metric", help="normalised, prob_delta or logit_diff.")]
FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="Take the parent stage(s) from a Hub dataset repo (USER/NAME) or an exported folder.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Output folder \\[default: the stage's version folder]."),
]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _layers(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in _csv(text))
    except ValueError:
        raise SeqpatchError(f"cannot read --layers {text!r}; give indices like 0,1,2") from None


@build_app.command(
    "activations",
    epilog=examples(
        "seqpatch build activations --sites resid_pre,mlp_out --dtype float16",
        "seqpatch build activations --sites resid_pre --layers 0,1 --pairs 3f2a",
        "seqpatch build activations --sites resid_pre --from ./exported-study",
        "NDIF_API_KEY=... seqpatch build activations --sites resid_pre --remote",
    ),
)
def build_activations(
    sites: SitesOpt = "resid_pre",
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32 (exact), float16 or bfloat16 (half size).")
    ] = "float32",
    layers: Annotated[
        str | None, typer.Option("--layers", help="Layers to cache \\[default: all].")
    ] = None,
    pairs: PairsVersionOpt = "latest",
    from_source: FromOpt = None,
    remote: RemoteOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Cache both programs' activations of every pair ([layers, positions, d_model] arrays).

    Load them with load_stage("activations").with_format("torch"); the patching stage reuses
    them instead of recomputing the sources.
    """
    from seqpatch.pipeline import build_activations as build

    ref = build(
        _csv(sites),
        dtype,
        _layers(layers),
        pairs,
        data_dir,
        from_source=from_source,
        remote=remote,
    )
    _report(ref)


@build_app.command(
    "patching",
    epilog=examples(
        "seqpatch build patching --sites resid_pre",
        "seqpatch build patching --sites resid_pre,attn_out,mlp_out --shard-size 100",
        "seqpatch build patching --sites resid_pre --shard 0/4   # one of four jobs",
        "seqpatch build patching --sites resid_pre --from you/variable-tracking",
    ),
)
def build_patching(
    sites: SitesOpt = "resid_pre",
    layers: Annotated[
        str | None, typer.Option("--layers", help="Layers to sweep \\[default: all].")
    ] = None,
    pairs: PairsVersionOpt = "latest",
    activations: Annotated[
        str,
        typer.Option(
            "--activations",
            help="'auto' (cached activations of these pairs if stored), 'none', or a version.",
        ),
    ] = "auto",
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Pairs per resumable shard.")
    ] = 250,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="INDEX/COUNT: build only this job's shards; `seqpatch merge` joins them.",
        ),
    ] = None,
    from_source: FromOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Patch A into B at every (layer, position) of each site, for every pair.

    Resumable: after Ctrl-C or a kill, the same command skips finished shards. Writes
    heatmap.npy and the heatmap/trace charts beside the stage.
    """
    from seqpatch.pipeline import build_patching as build
    from seqpatch.pipeline import parse_shard

    ref = build(
        _csv(sites),
        _layers(layers),
        pairs,
        activations,
        shard_size=shard_size,
        shard=parse_shard(shard),
        data_dir=data_dir,
        from_source=from_source,
    )
    if ref is None:
        typer.echo("this job's shards are built; run `seqpatch merge` once every job is done")
        return
    _report(ref)
    for chart in sorted(ref.path.glob("*.png")):
        typer.echo(f"chart: {chart}")


@app.command(
    "merge",
    epilog=examples(
        "seqpatch merge --sites resid_pre",
        "seqpatch merge --sites resid_pre --shard-size 100 --data-dir /shared/sp",
    ),
)
def merge(
    sites: SitesOpt = "resid_pre",
    layers: Annotated[str | None, typer.Option("--layers", help="As given to the jobs.")] = None,
    pairs: PairsVersionOpt = "latest",
    activations: Annotated[
        str, typer.Option("--activations", help="As given to the jobs.")
    ] = "auto",
    shard_size: Annotated[int, typer.Option("--shard-size", help="As given to the jobs.")] = 250,
    data_dir: DataDirOpt = None,
) -> None:
    """Join the shards that `seqpatch build patching --shard i/n` jobs built (same options).

    Shards that no job finished are built here, so merge always ends with a complete stage.
    """
    from seqpatch.pipeline import build_patching as build

    ref = build(
        _csv(sites), _layers(layers), pairs, activations, shard_size=shard_size, data_dir=data_dir
    )
    _report(ref)


@plot_app.command(
    "heatmap",
    epilog=examples(
        "seqpatch plot heatmap",
        "seqpatch plot heatmap --metric logit_diff --out ./figures",
    ),
)
def plot_heatmap(
    patching: PatchingVersionOpt = "latest",
    metric: MetricOpt = "normalised",
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Layer x token heatmap of the mean effect over pairs, one panel per site (HTML + PNG)."""
    from seqpatch.pipeline import plot_heatmap as plot
    from seqpatch.store import Store

    store = Store(data_dir)
    ref = store.resolve("patching", patching)
    name = "heatmap" if metric == "normalised" else f"heatmap_{metric}"
    for path in plot(store.load("patching", ref.version), out or ref.path, metric, name):
        typer.echo(f"chart: {path}")


@plot_app.command(
    "traces",
    epilog=examples(
        "seqpatch plot traces",
        "seqpatch plot traces --pair-id binding-L8-k3-0000042 --out ./figures",
    ),
)
def plot_traces(
    patching: PatchingVersionOpt = "latest",
    pair_id: Annotated[
        str | None, typer.Option("--pair-id", help="Pair to draw \\[default: the first].")
    ] = None,
    metric: MetricOpt = "normalised",
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """One pair's effect across layers for its changed, last and strongest tokens."""
    from seqpatch.pipeline import plot_traces as plot
    from seqpatch.store import Store

    store = Store(data_dir)
    ref = store.resolve("patching", patching)
    rows = store.load("patching", ref.version)
    for path in plot(rows, out or ref.path, metric, pair_id):
        typer.echo(f"chart: {path}")


@app.command(
    "run",
    epilog=examples(
        "seqpatch run",
        "seqpatch run --n-pairs 2000 --sites resid_pre --data-dir /tmp/sp",
    ),
)
def run(
    n_pairs: Annotated[int, typer.Option("--n-pairs", help="Counterfactual pairs.")] = 1000,
    max_seq_len: Annotated[
        int,
        typer.Option(
            "--max-seq-len",
            help="Longest program length for the pairs (the chosen length caps it).",
        ),
    ] = 8,
    min_accuracy: Annotated[
        float, typer.Option("--min-accuracy", help="Accuracy `choose` requires.")
    ] = 0.8,
    sites: SitesOpt = "resid_pre,attn_out,mlp_out",
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
) -> None:
    """The main job: the whole pipeline on the built-in model, end to end.

    programs -> benchmark -> choose -> pairs -> activations -> patching -> charts. Every step
    reuses a stored version with the same config, so a rerun (or a run after an interrupt)
    only does what is missing.
    """
    from seqpatch.pipeline import RunConfig
    from seqpatch.pipeline import run as run_pipeline

    cfg = RunConfig(
        min_accuracy=min_accuracy,
        max_seq_len=max_seq_len,
        n_pairs=n_pairs,
        sites=_csv(sites),
        seed=seed,
    )
    report = run_pipeline(cfg, data_dir, echo=typer.echo)
    total = sum(seconds for _, _, seconds in report.steps)
    typer.echo(f"done in {total:.0f} s. Charts:")
    for path in report.charts:
        typer.echo(f"  {path}")


# ---------------------------------------------------------------------------------------------
# list


@app.command("list", epilog=examples("seqpatch list", "seqpatch list --data-dir /tmp/sp"))
def list_stages(data_dir: DataDirOpt = None) -> None:
    """Show every stored stage version with its row count, parent and config."""
    from rich.console import Console
    from rich.table import Table

    from seqpatch.store import Store

    store = Store(data_dir)
    refs = store.refs()
    if not refs:
        typer.echo(
            f"no stages stored in {store.data_dir}; start with `seqpatch build programs`", err=True
        )
        return
    rows = [_list_row(ref.stage, ref.version, ref.provenance) for ref in refs]
    columns = ["stage", "version", "rows", "created", "parent", "model", "config"]
    shown = [i for i, name in enumerate(columns) if any(row[i] for row in rows)]
    table = Table(title=f"stages in {store.data_dir}")
    for i in shown:
        wraps = columns[i] in ("parent", "model", "config")
        table.add_column(columns[i], no_wrap=not wraps, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    Console().print(table)


def _list_row(stage: str, version: str, prov: Any) -> list[str]:
    from seqpatch.store import canonical_json

    parent = prov.get("parent") or {}
    model = prov.get("model") or {}
    config = prov.get("config") or {}
    return [
        stage,
        version,
        str(prov.get("row_count", "?")),
        str(prov.get("created", ""))[:16].replace("T", " "),
        f"{parent.get('stage')}/{parent.get('version')}" if parent else "",
        str(model.get("id") or ""),
        " ".join(
            f"{k}={v if isinstance(v, str) else canonical_json(v)}" for k, v in config.items()
        ),
    ]


# ---------------------------------------------------------------------------------------------
# push / export / import (seqpatch.hub)

StageArg = Annotated[
    str, typer.Argument(help="Stage: programs, benchmark, pairs, activations or patching.")
]
VersionOpt = Annotated[
    str, typer.Option("--version", help="Stored version (or a unique prefix), or 'latest'.")
]
ShardSizeOpt = Annotated[
    str, typer.Option("--max-shard-size", help="Largest parquet shard, e.g. 500MB or 2GB.")
]


@app.command(
    "push",
    epilog=examples(
        "seqpatch push programs --repo-id alice/seqpatch-arithmetic",
        "seqpatch push activations --repo-id alice/seqpatch-arithmetic --version 3f2a --private",
        "HF_TOKEN=hf_... seqpatch push patching --repo-id alice/seqpatch-arithmetic",
    ),
)
def push(
    stage: StageArg,
    repo_id: Annotated[
        str, typer.Option("--repo-id", help="Dataset repo USER/NAME; one repo holds every stage.")
    ],
    version: VersionOpt = "latest",
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    data_dir: DataDirOpt = None,
    max_shard_size: ShardSizeOpt = "500MB",
) -> None:
    """Publish a stored stage as a config of a Hub dataset repo, in one commit.

    Afterwards load_dataset("USER/NAME", "STAGE") works. Token: HF_TOKEN or `hf auth login`.
    """
    from seqpatch.hub import push_stage

    url = push_stage(
        stage,
        repo_id,
        version=version,
        private=private,
        data_dir=data_dir,
        max_shard_size=max_shard_size,
    )
    typer.echo(f"published {stage} as config {stage!r} of {repo_id}: {url}")


@app.command(
    "export",
    epilog=examples(
        "seqpatch export pairs --to ./study",
        "seqpatch export patching --to ./study --version 3f2a --repo-id alice/study",
    ),
)
def export(
    stage: StageArg,
    to: Annotated[Path, typer.Option("--to", help="Folder; other stages already there are kept.")],
    version: VersionOpt = "latest",
    data_dir: DataDirOpt = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Repo id shown in the card's examples.")
    ] = None,
    max_shard_size: ShardSizeOpt = "500MB",
) -> None:
    """Write a stored stage to a folder in exactly the layout `seqpatch push` uploads.

    Afterwards load_dataset("FOLDER", "STAGE", split="train") works.
    """
    from seqpatch.hub import export_stage

    folder = export_stage(
        stage,
        to,
        version=version,
        data_dir=data_dir,
        repo_id=repo_id,
        max_shard_size=max_shard_size,
    )
    typer.echo(f"exported {stage} to {folder} (load_dataset({str(folder)!r}, {stage!r}))")


@app.command(
    "import",
    epilog=examples(
        "seqpatch import activations --from alice/seqpatch-arithmetic",
        "seqpatch import pairs --from ./study --data-dir /tmp/sp",
    ),
)
def import_(
    stage: StageArg,
    source: Annotated[
        str, typer.Option("--from", help="Hub dataset repo USER/NAME, or a folder from export.")
    ],
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Register a published stage in the local store, so later stages build on it."""
    from seqpatch.hub import import_stage

    _report(import_stage(source, stage, data_dir, revision=revision))


# ---------------------------------------------------------------------------------------------
# organism (seqpatch.organism)


@organism_app.command(
    "train",
    epilog=examples(
        "seqpatch organism train --out ./organism",
        "seqpatch organism train --seed 1 --steps 600 --max-len 6 --out /tmp/organism",
    ),
)
def organism_train(
    out: Annotated[Path, typer.Option("--out", help="Folder that receives the trained model.")],
    family: Annotated[
        str,
        typer.Option("--family", help="Program family with one-digit answers: binding, modular."),
    ] = "binding",
    seed: SeedOpt = 0,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", help="Optimiser steps \\[default: the shipped model's].", show_default=False
        ),
    ] = None,
    max_len: Annotated[
        int | None,
        typer.Option(
            "--max-len",
            help="Longest program trained on \\[default: the shipped model's].",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Programs per step \\[default: the shipped model's].",
            show_default=False,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", help="Peak learning rate \\[default: the shipped model's].", show_default=False
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="torch threads; the weights depend on it \\[default: the shipped model's].",
            show_default=False,
        ),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train the built-in organism from scratch (deterministic from the seed on one machine).

    Every other setting is the shipped model's (seqpatch.organism.OrganismTrainConfig; all of
    them are options of scripts/train_organism.py). Writes the model, tokenizer, training.json
    and a model card to --out.
    """
    from seqpatch.organism import OrganismTrainConfig, train_organism

    overrides = {
        "steps": steps,
        "max_len": max_len,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
    }
    cfg = OrganismTrainConfig(
        family=family, seed=seed, **{k: v for k, v in overrides.items() if v is not None}
    )
    metrics = train_organism(cfg, out, progress=progress)
    accuracy = " ".join(f"{k}:{v:.3f}" for k, v in metrics["accuracy_by_length"].items())
    typer.echo(f"trained {metrics['n_params']:,} parameters in {metrics['train_wall_s']:.0f} s")
    typer.echo(f"held-out accuracy by length: {accuracy}")
    typer.echo(f"saved to {out}")


def main() -> None:
    app()
