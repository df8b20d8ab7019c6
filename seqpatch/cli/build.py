"""``seqpatch build <stage>``: build one pipeline stage into the store, or reuse a stored one."""

from __future__ import annotations

from typing import Annotated

import typer

from seqpatch.cli._common import (
    MAX_SEQ_LEN,
    DataDirOpt,
    FamilyOpt,
    FromOpt,
    OptionError,
    PairsVersionOpt,
    RemoteOpt,
    SeedOpt,
    SitesOpt,
    check_seq_lens,
    csv,
    examples,
    layers,
    report,
)

EXECUTORS = ("local", "ray")


def _check_executor(param: typer.CallbackParam, value: str) -> str:
    if value not in EXECUTORS:
        raise OptionError(f"unknown {param.opts[0]} {value!r}; use one of {', '.join(EXECUTORS)}")
    return value


ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        help="Where the shards are computed: local (this process) or ray (Ray actors, one per "
        "GPU or CPU slot; needs `pip install 'seqpatch\\[ray]'`). Same version either way.",
        callback=_check_executor,
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="With --executor ray: a running cluster's address (e.g. ray://head:10001) "
        "\\[default: a local Ray instance]. The data dir must be shared by every node.",
        show_default=False,
    ),
]

app = typer.Typer(
    help="Build one pipeline stage into the store (reuses a stored version with the same config).",
    no_args_is_help=True,
)


@app.command(
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
        str,
        typer.Option(
            "--seq-lens",
            help=f"Lengths: a range 1-10, a list 3,5,8, or 1-4,8 (each at most {MAX_SEQ_LEN}).",
        ),
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

    lens = check_seq_lens(parse_seq_lens(seq_lens), "--seq-lens")
    cfg = ProgramsConfig(family, lens, n_per_len, seed)
    report(build_stage("programs", cfg, data_dir=data_dir))


@app.command(
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
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help="Statements per program \\[default: the chosen length with --model chosen, else 8].",
            show_default=False,
            min=1,
            max=MAX_SEQ_LEN,
        ),
    ] = None,
    divergence_index: Annotated[
        str,
        typer.Option(
            "--divergence-index",
            help="Statement changed between A and B: 'all' (balanced), '3' or '0,2,5'.",
        ),
    ] = "all",
    n_pairs: Annotated[int, typer.Option("--n-pairs", help="Pairs to keep.", min=1)] = 2000,
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
    from seqpatch.pipeline import build_pairs as build_pairs_stage

    ref = build_pairs_stage(
        model, seq_len, divergence_index, n_pairs, seed, family, allow_equal_answers, data_dir
    )
    report(ref)
    extra = ref.provenance.get("extra", {})
    if "rejections" in extra:
        typer.echo(
            f"candidates {extra['candidates']}, accepted {extra['accepted']}; rejections: "
            + ", ".join(f"{k}={v}" for k, v in extra["rejections"].items())
        )


@app.command(
    "benchmark",
    epilog=examples(
        "seqpatch build benchmark --models builtin",
        "seqpatch build benchmark --models builtin,Qwen/Qwen2.5-0.5B --batch-size 32",
        "seqpatch build benchmark --models ./my-model:compact --programs 3f2a --data-dir /tmp/sp",
        "NDIF_API_KEY=... seqpatch build benchmark --models meta-llama/Llama-3.1-8B --remote",
        "seqpatch build benchmark --models builtin,./a,./b --executor ray   # a model per actor",
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
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run each model on each program: greedy answer, answer log-prob and rank.

    Writes results_summary.csv and accuracy.html/.png into the version folder. Resumes model by
    model after an interruption.
    """
    from seqpatch.pipeline import build_benchmark as build
    from seqpatch.stages.benchmark import (
        SUMMARY_CSV,
        BenchmarkConfig,
        accuracy_table,
        load_summary,
        parse_models,
    )

    if remote and executor != "local":
        raise OptionError("--remote runs on NDIF and --executor ray on Ray: choose one")
    cfg = BenchmarkConfig(parse_models(models), batch_size, max_new_tokens)
    ref = build(
        cfg,
        programs=programs,
        data_dir=data_dir,
        remote=remote,
        executor=executor,
        ray_address=ray_address,
    )
    report(ref)
    typer.echo(accuracy_table(load_summary(ref)))
    typer.echo(f"summary: {ref.path / SUMMARY_CSV}")
    for path in sorted(ref.path.glob("accuracy.*")):
        typer.echo(f"chart: {path}")


@app.command(
    "activations",
    epilog=examples(
        "seqpatch build activations --sites resid_pre,mlp_out --dtype float16",
        "seqpatch build activations --sites resid_pre --layers 0,1 --pairs 3f2a",
        "seqpatch build activations --sites resid_pre --from ./exported-study",
        "NDIF_API_KEY=... seqpatch build activations --sites resid_pre --remote",
        "seqpatch build activations --sites resid_pre --executor ray --ray-address ray://head:10001",
    ),
)
def build_activations(
    sites: SitesOpt = "resid_pre",
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32 (exact), float16 or bfloat16 (half size).")
    ] = "float32",
    layer_list: Annotated[
        str | None, typer.Option("--layers", help="Layers to cache \\[default: all].")
    ] = None,
    pairs: PairsVersionOpt = "latest",
    from_source: FromOpt = None,
    remote: RemoteOpt = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Cache both programs' activations of every pair ([layers, positions, d_model] arrays).

    Load them with load_stage("activations").with_format("torch"); the patching stage reuses
    them instead of recomputing the sources.
    """
    from seqpatch.pipeline import build_activations as build

    if remote and executor != "local":
        raise OptionError("--remote runs on NDIF and --executor ray on Ray: choose one")
    ref = build(
        csv(sites),
        dtype,
        layers(layer_list),
        pairs,
        data_dir,
        from_source=from_source,
        remote=remote,
        executor=executor,
        ray_address=ray_address,
    )
    report(ref)


@app.command(
    "patching",
    epilog=examples(
        "seqpatch build patching --sites resid_pre",
        "seqpatch build patching --sites resid_pre,attn_out,mlp_out --shard-size 100",
        "seqpatch build patching --sites resid_pre,attn_out,mlp_out --method attribution",
        "seqpatch build patching --sites head_z --axes layer,head",
        "seqpatch build patching --sites head_z,head_k --axes layer,head,pos",
        "seqpatch build patching --sites resid_pre --axes layer --positions from-divergence",
        "seqpatch build patching --sites resid_pre --shard 0/4   # one of four jobs",
        "seqpatch build patching --sites resid_pre --from you/variable-tracking",
        "seqpatch build patching --sites resid_pre --executor ray   # a local Ray instance",
        "seqpatch build patching --sites resid_pre --executor ray --ray-address ray://head:10001",
    ),
)
def build_patching(
    sites: SitesOpt = "resid_pre",
    layer_list: Annotated[
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
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="auto, cached or full (exact patching), or attribution (first-order "
            "estimates of the logit difference from one backward pass).",
        ),
    ] = "auto",
    axes: Annotated[
        str,
        typer.Option(
            "--axes",
            help="The grid: layer,pos; layer,head or layer,head,pos (head sites head_z, "
            "head_q, head_k, head_v); layer (whole-stream: all --positions at once).",
        ),
    ] = "layer,pos",
    positions: Annotated[
        str,
        typer.Option(
            "--positions",
            help="Without a pos axis, the positions patched at once: all, from-divergence, "
            "before-last (from the divergence up to the last token) or last. With a pos axis, "
            "the cells: all, or changed+ends+last (per pair: the changed tokens, the last token "
            "of every line from there on and the final token; other cells NaN).",
        ),
    ] = "all",
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Pairs per resumable shard.", min=1)
    ] = 250,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="INDEX/COUNT: build only this job's shards; `seqpatch merge` joins them.",
        ),
    ] = None,
    from_source: FromOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Patch A into B at every cell of each site's grid (default: every layer and position).

    Resumable: after Ctrl-C or a kill, the same command skips finished shards. Writes
    heatmap.npy and the heatmap/trace charts beside the stage.
    """
    from seqpatch.pipeline import build_patching as build
    from seqpatch.pipeline import parse_shard

    ref = build(
        csv(sites),
        layers(layer_list),
        pairs,
        activations,
        method=method,
        axes=csv(axes),
        positions=positions,
        shard_size=shard_size,
        shard=parse_shard(shard),
        data_dir=data_dir,
        from_source=from_source,
        executor=executor,
        ray_address=ray_address,
    )
    if ref is None:
        typer.echo("this job's shards are built; run `seqpatch merge` once every job is done")
        return
    report(ref)
    for chart in sorted(ref.path.glob("*.png")):
        typer.echo(f"chart: {chart}")


@app.command(
    "tracing",
    epilog=examples(
        "seqpatch build tracing",
        "seqpatch build tracing --corrupt diff --n-programs 200 --n-samples 10",
        "seqpatch build tracing --corrupt chain --kinds resid,mlp --window 3 --pairs 3f2a",
        "seqpatch build tracing --n-programs 0 --shard 0/4   # one of four jobs, every pair",
        "seqpatch build tracing --n-programs 0 --executor ray --ray-address ray://head:10001",
    ),
)
def build_tracing(
    corrupt: Annotated[
        str,
        typer.Option(
            "--corrupt",
            help="Tokens to corrupt: changed (the changed statement), diff (where A and B "
            "differ), chain (the query's reference chain) or a statement index such as 0.",
        ),
    ] = "changed",
    n_programs: Annotated[
        int,
        typer.Option("--n-programs", help="Trace the first N pairs (0: all of them).", min=0),
    ] = 100,
    n_samples: Annotated[
        int, typer.Option("--n-samples", help="Noise draws per program (ROME: 10).", min=1)
    ] = 10,
    noise_scale: Annotated[
        float,
        typer.Option(
            "--noise-scale", help="ν: noise σ = ν × std(input embeddings) (ROME: 3).", min=0
        ),
    ] = 3.0,
    window: Annotated[
        int | None,
        typer.Option(
            "--window",
            help="Layers per restored MLP/attention window \\[default: max(1, round(10·L/48)), "
            "ROME's 10 of 48 scaled to the model's depth].",
            show_default=False,
            min=1,
        ),
    ] = None,
    kinds: Annotated[
        str, typer.Option("--kinds", help="What to restore: resid, mlp, attn (comma-separated).")
    ] = "resid,mlp,attn",
    program: Annotated[
        str, typer.Option("--program", help="Which program of each pair: a or b.")
    ] = "b",
    sigma_basis: Annotated[
        str,
        typer.Option(
            "--sigma-basis",
            help="std over the whole embedding matrix (vocab) or over the corrupted tokens "
            "of every traced program (corrupted, ROME's choice).",
        ),
    ] = "vocab",
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Programs per resumable shard.", min=1)
    ] = 25,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="INDEX/COUNT: build only this job's shards; the same command without --shard "
            "joins them.",
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="auto, cached (restart from the restored layer; exact) or full (whole forwards).",
        ),
    ] = "auto",
    pairs: PairsVersionOpt = "latest",
    seed: SeedOpt = 0,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """ROME's causal trace (Meng et al. 2022) of one program of each pair.

    Adds Gaussian noise to the corrupted tokens' input embeddings, then restores each clean
    state in turn (residual stream, MLP and attention windows at every layer and token) and
    records P(correct answer). Writes aie.npy, aie_roles.npy, aie.json and the three-panel
    causal-trace chart beside the stage. Resumable, like patching.
    """
    from seqpatch.pipeline import build_tracing as build
    from seqpatch.pipeline import parse_shard

    ref = build(
        corrupt,
        n_programs,
        n_samples=n_samples,
        noise_scale=noise_scale,
        window=window,
        kinds=csv(kinds),
        program=program,
        sigma_basis=sigma_basis,
        seed=seed,
        shard_size=shard_size,
        method=method,
        pairs=pairs,
        shard=parse_shard(shard),
        data_dir=data_dir,
        executor=executor,
        ray_address=ray_address,
    )
    if ref is None:
        typer.echo(
            "this job's shards are built; once every job is done, rerun without --shard to join them"
        )
        return
    report(ref)
    for chart in sorted(ref.path.glob("*.png")):
        typer.echo(f"chart: {chart}")


@app.command(
    "das",
    epilog=examples(
        "seqpatch build das",
        "seqpatch build das --top-n 3 --ks 1,2,4,8,16,32,64,128 --epochs 20",
        "seqpatch build das --patching 3f2a --divergence-index 4 --metric prob_delta",
    ),
)
def build_das(
    top_n: Annotated[int, typer.Option("--top-n", help="Strongest heatmap cells.", min=1)] = 3,
    ks: Annotated[
        str | None,
        typer.Option("--ks", help="Subspace dimensions \\[default: 1,2,4,… and d_model]."),
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="Patching metric that ranks the cells.")
    ] = "normalised",
    divergence_index: Annotated[
        int | None,
        typer.Option(
            "--divergence-index", help="Study pairs diverging here \\[default: the commonest]."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.", min=1)] = 20,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per step.", min=1)] = 16,
    patching: Annotated[
        str, typer.Option("--patching", help="Patching version (or prefix), or 'latest'.")
    ] = "latest",
    pairs: Annotated[
        str | None,
        typer.Option("--pairs", help="Pairs version \\[default: the one patching was built from]."),
    ] = None,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
) -> None:
    """Distributed alignment search at the patching heatmap's strongest cells.

    Trains an orthonormal k-dimensional subspace per cell and k whose interchange makes the
    target give the source's answer; reports test IIA with controls (shuffled labels, random
    basis, full-vector patch). Writes iia.csv, summary.json and the IIA-vs-k chart.
    """
    from seqpatch.pipeline import build_das as build
    from seqpatch.stages.das import DasConfig

    try:
        k_list = tuple(int(k) for k in csv(ks)) if ks else ()
    except ValueError:
        raise OptionError(f"cannot read --ks {ks!r}; give sizes like 1,2,4,8") from None
    cfg = DasConfig(
        top_n=top_n,
        metric=metric,
        divergence_index=divergence_index,
        ks=k_list,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    ref = build(cfg, patching, pairs, data_dir)
    report(ref)
    for name in ("iia.csv", "summary.json", "iia_vs_k.png"):
        if (ref.path / name).exists():
            typer.echo(f"{name}: {ref.path / name}")
