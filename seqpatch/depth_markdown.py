"""The markdown of several chain studies side by side (``scripts/compare_models.py``).

Every number comes from one function of ``seqpatch.depth`` (a plain dict) and each bullet ends
with the one-liner that prints it; a step not built, or not finished, is said so (its
``StepStatus.words``). Means are rounded once, here, to two decimals (probabilities to three).
"""

from __future__ import annotations

from seqpatch.depth import (
    HELD,
    STEPS,
    ModelStudy,
    carriers,
    das_facts,
    handoff,
    statuses,
    step_status,
    stream_crossing,
    strongest_write,
    top_heads,
    tracing_facts,
)


def one_liner(ms: ModelStudy, function: str, *args: str) -> str:
    """The command that prints one finding of ``ms`` (``function`` of ``seqpatch.depth``)."""
    extra = "".join(f", {a!r}" for a in args)
    return (
        f'`python -c "from seqpatch.depth import open_study as o, {function}; '
        f"print({function}(o('{ms.data_dir}'){extra}))\"`"
    )


def _layers(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}–{last}"


def _range(low: float, high: float) -> str:
    return f"{low:.2f}" if round(low, 2) == round(high, 2) else f"{low:.2f}–{high:.2f}"


def _depth(layer: int | None, depth: float | None, mean: float | None = None) -> str:
    if layer is None:
        return "none"
    return f"layer {layer} ({depth:.2f} of depth" + ("" if mean is None else f", {mean:.2f}") + ")"


def model_findings(ms: ModelStudy) -> list[str]:
    """The markdown bullets of one model: each finding with its numbers and its one-liner, or
    the step's state when it has no numbers."""
    status = statuses(ms)
    lines = [
        "- **Steps**: "
        + "; ".join(f"{step} {status[step].words()}" for step in STEPS)
        + f". {one_liner(ms, 'statuses')}"
    ]
    patching = status["patching"]
    partial = (
        f" — **partial: {patching.pairs} of {patching.total} pairs**"
        if patching.state == "unfinished"
        else ""
    )
    moved = handoff(ms)
    if moved is None:
        lines.append("- **Where the value sits**: not measured (patching not run yet).")
    else:
        between = moved["between"]
        gap = (
            f"; between them ({_layers(between[0], between[-1])}) it sits on neither"
            if between and moved["value_until"] is not None and moved["handoff"] is not None
            else ""
        )
        until = (
            _depth(moved["value_until"], moved["value_until_depth"], moved["value_until_mean"])
            if moved["value_until"] is not None
            else "no layer"
        )
        hand = (
            _depth(moved["handoff"], moved["handoff_depth"], moved["handoff_mean"])
            if moved["handoff"] is not None
            else "no layer"
        )
        lines.append(
            f"- **Where the value sits**{partial} (`resid_pre`, {moved['n_layers']} layers, mean "
            f"over ≤ {moved['pairs']} pairs): the value's token carries ≥ {HELD} up to {until}; "
            f"hand-off — the last token carries ≥ {HELD} from {hand}{gap}. "
            + one_liner(ms, "handoff")
        )
        stretches = carriers(ms) or []
        words = ", ".join(
            f"{_layers(s['first'], s['last'])} {s['group']} ({_range(s['low'], s['high'])})"
            for s in stretches
        )
        lines.append(
            f"- **Which tokens carry it** (group of largest mean at each layer){partial}: "
            f"{words}. {one_liner(ms, 'carriers')}"
        )
        writes = [strongest_write(ms, site) for site in ("attn_out", "mlp_out")]
        said = [
            f"`{w['site']}` layer {w['layer']} ({w['depth']:.2f} of depth) at `{w['role']}` "
            f"{w['mean']:.2f} ({w['pairs']} pairs)"
            for w in writes
            if w is not None
        ]
        if said:
            lines.append(
                f"- **Strongest writes**{partial}: "
                + "; ".join(said)
                + ". "
                + " ".join(
                    one_liner(ms, "strongest_write", w["site"]) for w in writes if w is not None
                )
            )
    stream = stream_crossing(ms)
    if stream is None:
        lines.append(
            "- **Whole stream**: before-last "
            f"{status['stream-before-last'].words()}, last {status['stream-last'].words()}."
        )
    elif stream["layer"] is None:
        lines.append(
            "- **Whole stream**: the last token alone never carries more than the positions "
            f"before it. {one_liner(ms, 'stream_crossing')}"
        )
    else:
        lines.append(
            f"- **Whole stream**: the last token alone carries more than every position before "
            f"it from {_depth(stream['layer'], stream['depth'])} ({stream['last']:.2f} against "
            f"{stream['before_last']:.2f}). {one_liner(ms, 'stream_crossing')}"
        )
    heads = top_heads(ms)
    if heads is None:
        lines.append(f"- **Heads**: {status['heads'].words()}.")
    else:
        tops = ", ".join(f"L{h['layer']}.H{h['head']} {h['mean']:.2f}" for h in heads["top"])
        after = f"; the next {heads['next']:.2f}" if heads["next"] is not None else ""
        lines.append(
            f"- **Heads** (`head_z` at layers {', '.join(map(str, heads['layers']))}, patched "
            f"at {heads['positions']}): {tops}{after}. {one_liner(ms, 'top_heads')}"
        )
    trace = tracing_facts(ms)
    if trace is None:
        lines.append(f"- **Tracing**: {status['tracing'].words()}.")
    else:
        peak = trace["peak"]
        lines.append(
            f"- **Tracing** ({trace['programs']} programs, ν = {trace['noise_scale']:g}): "
            f"P(answer) clean {trace['clean']:.3f}, corrupted {trace['corrupted']:.3f}; largest "
            f"AIE {peak['aie']:.2f}, restoring `{peak['kind']}` at `{peak['role']}` entering "
            f"layer {peak['layer']} ({peak['depth']:.2f} of depth). {one_liner(ms, 'tracing_facts')}"
        )
    das = das_facts(ms)
    if das is None:
        lines.append(f"- **DAS**: {status['das'].words()}.")
    else:
        cells = "; ".join(
            f"`{c['site']}` layer {c['layer']} position {c['position']} (`{c['token']}`): full "
            f"patch {c['full_iia']:.2f}, DAS {c['das_iia']:.2f} at k = {c['k']}"
            f"{'' if c['smallest_k'] is not None else ' (its best; no k within tolerance)'} "
            f"(shuffled {c['shuffled_iia']:.2f}, random {c['random_iia']:.2f})"
            for c in das
        )
        lines.append(f"- **DAS** (IIA on held-out pairs): {cells}. {one_liner(ms, 'das_facts')}")
    return lines


def fragment(models: list[ModelStudy], command: str, chart: str | None = None) -> str:
    """The markdown of the side-by-side section: a table of how far each study got and where
    the value is handed to the last token, then each model's findings; ``command`` regenerates
    it, ``chart`` is the comparison chart's path relative to the fragment."""
    out = [
        "<!-- generated by scripts/compare_models.py: do not edit by hand, rerun its command -->",
        "",
        f"Generated by `{command}` from the stored stages. Definitions: `seqpatch/depth.py`.",
        "",
    ]
    if chart:
        out += [f"![effect against relative depth, per model and token group]({chart})", ""]
    names = [ms.name for ms in models]
    out.append("| | " + " | ".join(names) + " |")
    out.append("|---" * (len(models) + 1) + "|")
    table: dict[str, list[str]] = {
        "pairs": [],
        **{s: [] for s in STEPS},
        "hand-off": [],
        "stream": [],
        "tracing peak": [],
    }
    for ms in models:
        table["pairs"].append(str(ms.n_pairs) if ms.n_pairs else "not built yet")
        for step, st in statuses(ms).items():
            table[step].append(st.words())
        moved = handoff(ms)
        table["hand-off"].append(
            "—"
            if moved is None or moved["handoff"] is None
            else f"layer {moved['handoff']} of {moved['n_layers']} "
            f"({moved['handoff_depth']:.2f})"
            + (" partial" if step_status(ms, "patching").state == "unfinished" else "")
        )
        stream = stream_crossing(ms)
        table["stream"].append(
            "—"
            if stream is None or stream["layer"] is None
            else f"layer {stream['layer']} ({stream['depth']:.2f})"
        )
        trace = tracing_facts(ms)
        table["tracing peak"].append(
            "—"
            if trace is None
            else f"`{trace['peak']['kind']}` at `{trace['peak']['role']}`, layer "
            f"{trace['peak']['layer']} ({trace['peak']['depth']:.2f}): {trace['peak']['aie']:.2f}"
        )
    titles = {
        "hand-off": "hand-off: last token ≥ 0.5 from (relative depth)",
        "stream": "whole stream: last alone > all before it from",
        "tracing peak": "tracing: largest AIE (relative depth)",
    }
    for key, cells in table.items():
        out.append(f"| {titles.get(key, key)} | " + " | ".join(cells) + " |")
    for ms in models:
        out += ["", f"**{ms.name}** (`{ms.data_dir}`)", "", *model_findings(ms)]
    return "\n".join(out) + "\n"
