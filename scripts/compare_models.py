"""Chain studies of several models side by side: one chart and one markdown fragment.

Reads each study folder (``scripts/study_pretrained.py``'s ``study.json`` and the stored stages)
through ``seqpatch.views.Study`` — it never builds or writes anything there — and writes

- ``OUT/NAME.png`` and ``OUT/NAME.vl.json`` (the Vega-Lite spec): the mean normalised effect of
  patching ``resid_pre`` against relative depth, one line per model, one panel per token group
  (``seqpatch.depth``);
- ``OUT/NAME.md``: per-model findings with their numbers and one-liners, every step not built
  or not finished said so; with ``--into FILE`` the same text replaces what lies between
  ``<!-- compare-models:start -->`` and ``<!-- compare-models:end -->`` in FILE.

    python scripts/compare_models.py --study builtin=/work/studies/builtin \\
        --study smollm2=/work/studies/smollm2-135m-instruct \\
        --study gemma3=/work/studies/gemma3-270m --out docs --into docs/pretrained.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

START = "<!-- compare-models:start -->"
END = "<!-- compare-models:end -->"


def fail(message: str) -> None:
    """A user's mistake: one line on stderr, exit status 2, before any work."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_studies(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            fail(f"--study {item!r} must be NAME=DIR (e.g. builtin=/work/studies/builtin)")
        if not (Path(folder) / "study.json").is_file():
            fail(f"{folder} has no study.json; give a chain study's data folder")
        out.append((name, Path(folder)))
    if len({name for name, _ in out}) != len(out):
        fail("two --study options have the same NAME; give each model its own")
    return out


def notes(models, curves) -> list[str]:
    """The subtitle's lines: each model's pairs and layers, partial or missing patching."""
    from seqpatch.depth import step_status

    out = []
    for ms in models:
        status = step_status(ms, "patching")
        if status.state == "not run":
            out.append(f"{ms.name}: patching not run yet (no line)")
            continue
        n_layers = curves.filter(curves["model"] == ms.name)["n_layers"][0]
        if status.state == "done":
            out.append(f"{ms.name}: {status.pairs} pairs, {n_layers} layers")
        else:
            out.append(
                f"{ms.name}: PARTIAL, {status.pairs} of {status.total} pairs (patching not "
                f"finished), {n_layers} layers"
            )
    return ["; ".join(out) + "."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="append", required=True, help="NAME=DIR, repeated")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the outputs")
    parser.add_argument("--name", default="compare-models", help="file stem of the outputs")
    parser.add_argument("--into", type=Path, help="markdown file whose marked section to replace")
    args = parser.parse_args()
    studies = parse_studies(args.study)
    if args.into is not None:
        text = args.into.read_text() if args.into.is_file() else ""
        if START not in text or END not in text:
            fail(f"{args.into} has no {START} … {END} section to replace")

    import polars as pl

    from seqpatch.charts.depth import depth_figure
    from seqpatch.charts.style import save_chart
    from seqpatch.depth import GROUP_TITLES, GROUPS, depth_curves, open_study
    from seqpatch.depth_markdown import fragment
    from seqpatch.redact import redact_chart

    models = [open_study(folder, name) for name, folder in studies]
    frames = [depth_curves(ms) for ms in models]
    drawn = [f for f in frames if not f.is_empty()]
    curves = pl.concat(drawn, how="diagonal_relaxed") if drawn else pl.DataFrame()
    if curves.is_empty():
        fail("no study has a patching grid yet (not even unfinished shards); nothing to draw")
    chart = depth_figure(curves, GROUPS, GROUP_TITLES, notes(models, curves))
    args.out.mkdir(parents=True, exist_ok=True)
    (png,) = save_chart(chart, args.out, args.name, ("png",))
    spec = args.out / f"{args.name}.vl.json"
    spec.write_text(json.dumps(redact_chart(chart).to_dict(), indent=1, ensure_ascii=False) + "\n")
    words = [f"--study {name}={folder}" for name, folder in studies] + [f"--out {args.out}"]
    if args.name != "compare-models":
        words.append(f"--name {args.name}")
    if args.into is not None:
        words.append(f"--into {args.into}")
    command = "python scripts/compare_models.py " + " ".join(words)
    md_dir = args.into.parent if args.into is not None else args.out
    chart_link = os.path.relpath(Path(png).resolve(), md_dir.resolve())
    text = fragment(models, command, chart_link)
    (args.out / f"{args.name}.md").write_text(text)
    if args.into is not None:
        old = args.into.read_text()
        head, rest = old.split(START, 1)
        args.into.write_text(f"{head}{START}\n{text}{END}{rest.split(END, 1)[1]}")
    print(f"wrote {png}, {spec}, {args.out / f'{args.name}.md'}")


if __name__ == "__main__":
    main()
