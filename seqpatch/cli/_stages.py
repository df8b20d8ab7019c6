"""``seqpatch build <stage>`` commands derived from the stages' configs, made on first use.

A derived command's options are its config's ``option`` fields (``seqpatch.options``), the
parent selectors and the ``RuntimeSettings`` it uses; its body calls the ``seqpatch.pipeline``
function. Config classes live in stage modules that import torch and datasets, so
``LazyStageGroup`` builds such a command only when it is asked for: ``seqpatch --help`` and
``seqpatch list`` stay fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from seqpatch.cli._common import (
    MAX_SEQ_LEN,
    DataDirOpt,
    FromOpt,
    PairsVersionOpt,
    PatchingVersionOpt,
    _reflow_help,
    examples,
    report,
)
from seqpatch.cli._options import command, option_parameters, param
from seqpatch.options import RuntimeSettings


def _runtime_opt(name: str) -> Any:
    return option_parameters(RuntimeSettings, [name])[0].annotation


ExecutorOpt = _runtime_opt("executor")
RayAddressOpt = _runtime_opt("ray_address")
DeviceOpt = _runtime_opt("device")

ActivationsVersionOpt = Annotated[
    str,
    typer.Option(
        "--activations",
        help="'auto' (cached activations of these pairs if stored), 'none', or a version.",
    ),
]


def _shard_opt(joined_by: str) -> Any:
    return Annotated[
        str | None,
        typer.Option("--shard", help=f"INDEX/COUNT: build only this job's shards; {joined_by}."),
    ]


@dataclass(frozen=True)
class StageCommand:
    """How to make one derived command: its config, extra options, runtime options, body."""

    config: Callable[[], type]
    run: Callable[..., None]
    doc: str
    epilog: str
    extra: Callable[[], list[inspect.Parameter]]
    runtime: tuple[str, ...]
    shard_size: Callable[[], int | None] = lambda: None
    raw: bool = False  # the config's option values reach `run` as a dict (see `command`)
    # options naming models (`--models` takes a comma-separated list): checked before the
    # command is made, since making it imports torch (see `check_model_options`)
    model_options: tuple[str, ...] = ()


def _charts(ref: Any) -> None:
    for chart in sorted(ref.path.glob("*.png")):
        typer.echo(f"chart: {chart}")


def _activations(cfg: Any, runtime: RuntimeSettings, **extra: Any) -> None:
    from seqpatch.cli._common import OptionError
    from seqpatch.pipeline import build_activations

    if extra["remote"] and runtime.executor != "local":
        raise OptionError("--remote runs on NDIF and --executor ray on Ray: choose one")
    report(build_activations(cfg, **extra, runtime=runtime))


def _patching(cfg: Any, runtime: RuntimeSettings, shard: str | None, **extra: Any) -> None:
    from seqpatch.pipeline import build_patching, parse_shard

    ref = build_patching(cfg, shard=parse_shard(shard), runtime=runtime, **extra)
    if ref is None:
        typer.echo(
            "this job's shards are built; run `seqpatch merge patching` once every job is done"
        )
        return
    report(ref)
    _charts(ref)


def _tracing(cfg: Any, runtime: RuntimeSettings, shard: str | None, **extra: Any) -> None:
    from seqpatch.pipeline import build_tracing, parse_shard

    ref = build_tracing(cfg, shard=parse_shard(shard), runtime=runtime, **extra)
    if ref is None:
        typer.echo(
            "this job's shards are built; run `seqpatch merge tracing` once every job is done"
        )
        return
    report(ref)
    _charts(ref)


def _programs(cfg: Any, runtime: RuntimeSettings, data_dir: Any) -> None:
    from seqpatch.cli._common import check_seq_lens
    from seqpatch.pipeline import build_programs

    check_seq_lens(cfg.seq_lens, "--seq-lens")
    report(build_programs(cfg, data_dir=data_dir))


def _pairs(options: dict[str, Any], runtime: RuntimeSettings, **given: Any) -> None:
    from seqpatch.pipeline import build_pairs

    divergence = given.pop("divergence_index")
    ref = build_pairs(divergence=divergence, runtime=runtime, **given, **options)
    report(ref)
    from seqpatch.stages.pairs import describe_rejections

    extra = ref.provenance.get("extra", {})
    if "rejections" in extra:
        typer.echo(
            f"candidates {extra['candidates']}, accepted {extra['accepted']}; "
            + describe_rejections(extra["rejections"])
        )


def _pairs_options() -> list[inspect.Parameter]:
    """The pairs options that ``pipeline.pairs_config`` resolves (``chosen``, a divergence list
    read against the length, the model's default family); any other ``PairsConfig`` field
    declared with ``option`` is added after them."""
    from seqpatch.cli._common import MAX_SEQ_LEN, SeedOpt

    return [
        param(
            "model",
            Annotated[
                str,
                typer.Option(
                    "--model",
                    help="builtin, chosen (reads chosen_model.json), a local folder or a Hub id.",
                ),
            ],
            "builtin",
        ),
        param(
            "seq_len",
            Annotated[
                int | None,
                typer.Option(
                    "--seq-len",
                    help="Statements per program \\[default: the chosen length with --model "
                    "chosen, else 8].",
                    show_default=False,
                    min=1,
                    max=MAX_SEQ_LEN,
                ),
            ],
            None,
        ),
        param(
            "divergence_index",
            Annotated[
                str,
                typer.Option(
                    "--divergence-index",
                    help="Statement changed between A and B: 'all' (balanced), '3' or '0,2,5'.",
                ),
            ],
            "all",
        ),
        param(
            "n_pairs",
            Annotated[int, typer.Option("--n-pairs", help="Pairs to keep.", min=1)],
            2000,
        ),
        param(
            "family",
            Annotated[
                str | None,
                typer.Option(
                    "--family",
                    help="Program family \\[default: the organism's own for builtin, else "
                    "binding].",
                    show_default=False,
                ),
            ],
            None,
        ),
        param(
            "allow_equal_answers",
            Annotated[
                bool,
                typer.Option(
                    "--allow-equal-answers", help="Also keep pairs whose two answers are equal."
                ),
            ],
            False,
        ),
        param("seed", SeedOpt, 0),
        param("data_dir", DataDirOpt, None),
    ]


def _benchmark(
    cfg: Any, runtime: RuntimeSettings, programs: str, remote: bool, data_dir: Any
) -> None:
    from seqpatch.cli._common import OptionError
    from seqpatch.pipeline import build_benchmark
    from seqpatch.stages.benchmark import SUMMARY_CSV, accuracy_table, load_summary

    if remote and runtime.executor != "local":
        raise OptionError("--remote runs on NDIF and --executor ray on Ray: choose one")
    ref = build_benchmark(cfg, programs=programs, data_dir=data_dir, remote=remote, runtime=runtime)
    report(ref)
    typer.echo(accuracy_table(load_summary(ref)))
    typer.echo(f"summary: {ref.path / SUMMARY_CSV}")
    for path in sorted(ref.path.glob("accuracy.*")):
        typer.echo(f"chart: {path}")


def _das(
    cfg: Any, runtime: RuntimeSettings, patching: str, pairs: str | None, data_dir: Any
) -> None:
    from seqpatch.pipeline import build_das

    ref = build_das(cfg, patching, pairs, data_dir, runtime=runtime)
    report(ref)
    ranked = next((p["version"] for p in ref.parents if p.get("stage") == "patching"), None)
    typer.echo(f"ranked the cells of patching version {ranked}")
    for name in ("iia.csv", "summary.json", "iia_vs_k.png"):
        if (ref.path / name).exists():
            typer.echo(f"{name}: {ref.path / name}")


def _config(module: str, name: str) -> Callable[[], type]:
    def load() -> type:
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


def _shard_size(module: str) -> Callable[[], int | None]:
    def load() -> int | None:
        import importlib

        return importlib.import_module(module).SHARD_SIZE

    return load


RUNTIME = ("shard_size", "engine", "executor", "ray_address", "device")

STAGE_COMMANDS: dict[str, StageCommand] = {
    "programs": StageCommand(
        _config("seqpatch.stages.programs", "ProgramsConfig"),
        _programs,
        f"""Sample programs of one family: the task rows every later stage starts from.

        Each length is at most {MAX_SEQ_LEN} statements.
        """,
        examples(
            "seqpatch build programs --family arithmetic --seq-lens 1-10 --n-per-len 200 --seed 0",
            "seqpatch build programs --family binding --seq-lens 3,5,8 --n-per-len 50",
            "seqpatch build programs --family modular --seq-lens 1-4,8 --data-dir /tmp/sp",
        ),
        lambda: [param("data_dir", DataDirOpt, None)],
        (),
    ),
    "pairs": StageCommand(
        _config("seqpatch.stages.pairs", "PairsConfig"),
        _pairs,
        """Counterfactual pairs (A, B) differing in one statement, both answered correctly.

        Token lengths of A and B are verified equal under the model's tokenizer; rejected
        candidates are counted by reason and stored in the stage's provenance.
        """,
        examples(
            "seqpatch build pairs --model builtin --seq-len 8 --divergence-index all --n-pairs 2000",
            "seqpatch build pairs --model chosen --seq-len 6 --divergence-index 2 --n-pairs 500",
            "seqpatch build pairs --model ./my-model --family binding --seq-len 5 "
            "--allow-equal-answers",
        ),
        _pairs_options,
        ("device",),
        raw=True,
        model_options=("--model",),
    ),
    "benchmark": StageCommand(
        _config("seqpatch.stages.benchmark", "BenchmarkConfig"),
        _benchmark,
        """Run each model on each program: greedy answer, answer log-prob and rank.

        Writes results_summary.csv and accuracy.html/.png into the version folder. Resumes model
        by model after an interruption.
        """,
        examples(
            "seqpatch build benchmark --models builtin",
            "seqpatch build benchmark --models builtin,Qwen/Qwen2.5-0.5B --batch-size 32",
            "seqpatch build benchmark --models ./my-model:compact --programs 3f2a --data-dir /tmp/sp",
            "NDIF_API_KEY=... seqpatch build benchmark --models meta-llama/Llama-3.1-8B --remote",
            "seqpatch build benchmark --models builtin,./a,./b --executor ray   # a model per actor",
        ),
        lambda: [
            param(
                "programs",
                Annotated[
                    str,
                    typer.Option("--programs", help="Programs version (or a prefix), or 'latest'."),
                ],
                "latest",
            ),
            param("remote", _remote_opt(), False),
            param("data_dir", DataDirOpt, None),
        ],
        ("executor", "ray_address", "device"),
        model_options=("--models",),
    ),
    "activations": StageCommand(
        _config("seqpatch.stages.activations", "ActivationsConfig"),
        _activations,
        """Cache both programs' activations of every pair (\\[layers, positions, d_model] arrays).

        Load them with load_stage("activations").with_format("torch"); the patching stage
        reuses them instead of recomputing the sources.
        """,
        examples(
            "seqpatch build activations --sites resid_pre,mlp_out --dtype float16",
            "seqpatch build activations --sites resid_pre --layers 0,1 --pairs 3f2a",
            "seqpatch build activations --sites resid_pre --from ./exported-study",
            "NDIF_API_KEY=... seqpatch build activations --sites resid_pre --remote",
            "seqpatch build activations --sites resid_pre --executor ray --ray-address "
            "ray://head:10001",
            "seqpatch build activations --sites resid_pre --device cuda",
        ),
        lambda: [
            param("pairs", PairsVersionOpt, "latest"),
            param("from_source", FromOpt, None),
            param("remote", _remote_opt(), False),
            param("data_dir", DataDirOpt, None),
        ],
        ("shard_size", "executor", "ray_address", "device"),
        _shard_size("seqpatch.stages.activations"),
    ),
    "patching": StageCommand(
        _config("seqpatch.stages.patching", "PatchingConfig"),
        _patching,
        """Patch A into B at every cell of each site's grid (default: every layer and position).

        Resumable: after Ctrl-C or a kill, the same command skips finished shards. Writes
        heatmap.npy and the heatmap/trace charts beside the stage. The execution settings
        (--shard-size, --engine, --executor, --device) never change the version.
        """,
        examples(
            "seqpatch build patching --sites resid_pre",
            "seqpatch build patching --sites resid_pre,attn_out,mlp_out --shard-size 100",
            "seqpatch build patching --sites resid_pre,attn_out,mlp_out --method attribution",
            "seqpatch build patching --sites head_z --axes layer,head",
            "seqpatch build patching --sites head_z,head_k --axes layer,head,pos",
            "seqpatch build patching --sites resid_pre --axes layer --positions from-divergence",
            "seqpatch build patching --sites resid_pre --shard 0/4   # one of four jobs",
            "seqpatch build patching --sites resid_pre --from you/variable-tracking",
            "seqpatch build patching --sites resid_pre --executor ray   # a local Ray instance",
            "seqpatch build patching --sites resid_pre --executor ray --ray-address "
            "ray://head:10001",
            "seqpatch build patching --sites resid_pre --device cuda --engine full",
        ),
        lambda: [
            param("pairs", PairsVersionOpt, "latest"),
            param("activations", ActivationsVersionOpt, "auto"),
            param("shard", _shard_opt("`seqpatch merge patching` joins them"), None),
            param("from_source", FromOpt, None),
            param("data_dir", DataDirOpt, None),
        ],
        RUNTIME,
        _shard_size("seqpatch.stages.patching"),
    ),
    "tracing": StageCommand(
        _config("seqpatch.stages.tracing", "TracingConfig"),
        _tracing,
        """ROME's causal trace (Meng et al. 2022) of one program of each pair.

        Adds Gaussian noise to the corrupted tokens' input embeddings, then restores each clean
        state in turn (residual stream, MLP and attention windows at every layer and token) and
        records P(correct answer). Writes aie.npy, aie_roles.npy, aie.json and the three-panel
        causal-trace chart beside the stage. Resumable, like patching.
        """,
        examples(
            "seqpatch build tracing",
            "seqpatch build tracing --corrupt diff --n-programs 200 --n-samples 10",
            "seqpatch build tracing --corrupt chain --kinds resid,mlp --window 3 --pairs 3f2a",
            "seqpatch build tracing --n-programs 0 --shard 0/4   # one of four jobs, every pair",
            "seqpatch build tracing --n-programs 0 --executor ray --ray-address ray://head:10001",
        ),
        lambda: [
            param("pairs", PairsVersionOpt, "latest"),
            param("shard", _shard_opt("`seqpatch merge tracing` joins them"), None),
            param("data_dir", DataDirOpt, None),
        ],
        RUNTIME,
        _shard_size("seqpatch.stages.tracing"),
    ),
    "das": StageCommand(
        _config("seqpatch.stages.das", "DasConfig"),
        _das,
        """Distributed alignment search at the patching heatmap's strongest cells.

        Trains an orthonormal k-dimensional subspace per cell and k whose interchange makes the
        target give the source's answer; reports test IIA with controls (shuffled labels, random
        basis, full-vector patch). Writes iia.csv, summary.json and the IIA-vs-k chart.
        Resumes cell by cell after an interruption: the same command skips finished cells.
        """,
        examples(
            "seqpatch build das",
            "seqpatch build das --top-n 3 --ks 1,2,4,8,16,32,64,128 --epochs 20",
            "seqpatch build das --patching 3f2a --divergence-index 4 --metric prob_delta",
        ),
        lambda: [
            param("patching", PatchingVersionOpt, "latest"),
            param("pairs", _das_pairs_opt(), None),
            param("data_dir", DataDirOpt, None),
        ],
        ("device",),
    ),
}


def _das_pairs_opt() -> Any:
    return Annotated[
        str | None,
        typer.Option("--pairs", help="Pairs version \\[default: the one patching was built from]."),
    ]


def _remote_opt() -> Any:
    from seqpatch.cli._common import RemoteOpt

    return RemoteOpt


def make_command(name: str) -> Any:
    """The click command of derived stage command ``name`` (imports its stage module)."""
    spec = STAGE_COMMANDS[name]
    sub = typer.Typer(add_completion=False)
    command(
        sub,
        name,
        spec.config(),
        spec.run,
        doc=spec.doc,
        epilog=spec.epilog,
        extra=spec.extra(),
        runtime=spec.runtime,
        runtime_defaults={"shard_size": spec.shard_size()} if spec.shard_size() else None,
        raw=spec.raw,
    )
    click_command = typer.main.get_command(sub)
    _reflow_help(click_command)
    return click_command


CHOSEN = "chosen"  # `build pairs --model chosen`: the spec in chosen_model.json, not a name
HELP_FLAGS = ("--help", "-h")


def model_option_values(args: list[str], flag: str) -> list[str]:
    """The model specs given to ``flag`` in raw arguments (``--models a,b`` or ``--models=a``),
    each spec of a comma-separated ``--models`` list on its own."""
    values = []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1 :])
    if flag == "--models":
        values = [spec for value in values for spec in value.split(",")]
    return [spec.strip() for spec in values if spec.strip()]


def check_model_options(name: str, args: list[str]) -> None:
    """Classify every model a stage command names (``seqpatch.models.specs``: no torch, no
    network) before the command is made: a misspelled name, a missing folder or a non-Hub id
    fails in a fraction of a second with the same one line ``load_model`` would give later."""
    spec = STAGE_COMMANDS.get(name)
    if spec is None or not spec.model_options or any(a in HELP_FLAGS for a in args):
        return
    from seqpatch.models.specs import classify
    from seqpatch.stages.base import split_model_spec

    for flag in spec.model_options:
        for value in model_option_values(args, flag):
            model, _ = split_model_spec(value)
            if model != CHOSEN:
                classify(model)


class LazyStageGroup(TyperGroup):
    """A group whose derived stage commands (``STAGE_COMMANDS``) are made when first used.

    A command's model options are checked before it is made (``check_model_options``)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and not ctx.resilient_parsing:
            check_model_options(args[0], args[1:])
        return super().resolve_command(ctx, args)

    def list_commands(self, ctx: Any) -> list[str]:
        from seqpatch.stages import STAGES

        names = {*super().list_commands(ctx), *STAGE_COMMANDS}
        return [n for n in STAGES if n in names] + sorted(names - set(STAGES))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in STAGE_COMMANDS and cmd_name not in self.commands:
            self.commands[cmd_name] = make_command(cmd_name)
        return super().get_command(ctx, cmd_name)
