"""What every chart shares: the metric and site names, colours, scales, and saving.

Colour convention on every patching chart: blue = the patch moved B towards A's answer, red =
B's own answer held or strengthened, 0 = white (``color_scale``). The words come from one table,
``seqpatch.metrics.METRIC_INFO``; site names from ``site_title`` (one function, so the site
table can own them). Importing this module does not import altair (the data views use it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from seqpatch.errors import SeqpatchError
from seqpatch.metrics import METRIC_INFO
from seqpatch.site_table import SITE_TABLE

if TYPE_CHECKING:
    import altair as alt

METRIC_TITLES = {name: info.title for name, info in METRIC_INFO.items()}
LEGEND_TITLES = {name: list(info.legend) for name, info in METRIC_INFO.items()}
# What the colours mean, one sentence per metric (the heatmap's caption).
METRIC_MEANINGS = {name: f"Colour: {info.colour}." for name, info in METRIC_INFO.items()}
# Every metric is signed (a patch can push B either way): all are drawn on diverging scales.
SIGNED_METRICS = tuple(METRIC_INFO)
SEQUENTIAL_METRICS: tuple[str, ...] = ()
# Display names: two short lines so narrow panels keep them whole; joined with a space elsewhere.
SITE_TITLES: dict[str, tuple[str, str]] = {name: info.title for name, info in SITE_TABLE.items()}
WHITE = "#ffffff"
TOWARDS_A = "#2166ac"  # blue: the patch moved B towards A's answer
TOWARDS_B = "#b2182b"  # red: B's answer held or strengthened
NO_DATA = "#d9d9d9"
# Every chart's text, named rather than left to the renderer's "sans-serif": vl-convert (PNG,
# SVG) resolves that generic name to a font without the visible-whitespace marks (``·``, ``↵``,
# ``⇥``) and draws them in a serif fallback. DejaVu Sans has them, ships with Debian (fonts-dejavu,
# which Chromium pulls in) and with most Linux desktops; browsers without it use the next names.
FONT = "DejaVu Sans"
FONT_FALLBACKS = "Verdana, sans-serif"
ChartFormat = str


class ChartError(SeqpatchError):
    """A chart was asked for data it cannot draw (unknown metric, empty frame)."""


# Where A's activation is patched in a grid without a position axis (the rows' ``span``) or which
# cells of a grid with one were patched: the subtitles' words.
POSITION_SET_TITLES = {
    "all": "every position at once",
    "from-divergence": "every position from the first changed token on, at once",
    "before-last": "every position from the first changed token up to, not including, the last "
    "token, at once",
    "last": "the last token alone",
}
POSITION_SELECTION_TITLES = {
    "": "every token",
    "all": "every token",
    "changed+ends+last": "only the changed tokens, later line ends and the last token",
    "slice": "only the changed statement, its later hops, the question and the last token",
}


def span_title(span: str | None) -> str:
    """The words for a position set (``POSITION_SET_TITLES``); an unknown one is named as it is,
    never passed off as another."""
    span = span or "all"
    return POSITION_SET_TITLES.get(span, f"the position set {span!r} at once")


def method_title(method: str | None) -> str:
    """How a chart's heading names the method: exact patching, or attribution named as what it
    is, a first-order estimate."""
    if method == "attribution":
        return "Attribution patching (first-order estimate, not exact patching)"
    return "Activation patching"


def mean_title(method: str | None) -> str:
    """``Mean`` for exact patching, ``Estimated mean`` for attribution (subtitles)."""
    return "Estimated mean" if method == "attribution" else "Mean"


def legend_title(metric: str, method: str | None = None) -> list[str]:
    """A colour legend's lines; attribution's start with ``estimated``."""
    lines = list(LEGEND_TITLES[metric])
    return ["estimated", *lines] if method == "attribution" else lines


def site_title(site: str, sep: str = " ") -> str:
    """The display name of ``site`` (``resid_pre`` → ``residual stream (layer input)``)."""
    return sep.join(SITE_TITLES.get(site, (site,)))


def check_metric(metric: str) -> None:
    """Raise ``ChartError`` naming the known metrics unless ``metric`` is one."""
    if metric not in METRIC_INFO:
        raise ChartError(f"unknown metric {metric!r}; use one of {', '.join(METRIC_INFO)}")


_check_metric = check_metric


def ordinal(n: int) -> str:
    """``1`` → ``1st``, ``2`` → ``2nd``, ``11`` → ``11th``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def color_scale(metric: str, values: Iterable[float] = ()) -> alt.Scale:
    """The diverging colour scale of ``metric``, centred at 0 (pure white) on every metric.

    The side that means "towards A's answer" (``MetricInfo.towards_a``) is blue, the other red.
    Probabilities span ``[-1, 1]``; ``normalised`` spans at least ``[-1, 1]`` (1 = switched);
    ``logit_diff`` is symmetric at the largest ``|value|`` (a nice ceiling), so its colours
    never saturate; values beyond a bound are drawn at its end colour (clamped).
    """
    import altair as alt

    check_metric(metric)
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    bound = nice_ceiling(max(finite, default=1.0)) if metric == "logit_diff" else 1.0
    ends = [TOWARDS_A, TOWARDS_B] if METRIC_INFO[metric].towards_a < 0 else [TOWARDS_B, TOWARDS_A]
    return alt.Scale(
        domain=[-bound, 0, bound], range=[ends[0], WHITE, ends[1]], clamp=True, interpolate="lab"
    )


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^n that is ≥ ``x`` (a legend-friendly bound)."""
    if x <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(x))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= x - 1e-12)


_nice_ceiling = nice_ceiling


def font_family(fallbacks: bool = True) -> str:
    """The charts' CSS font family: ``FONT``, then (for browsers) ``FONT_FALLBACKS``."""
    return f"{FONT}, {FONT_FALLBACKS}" if fallbacks else FONT


def with_font(chart: alt.TopLevelMixin, fallbacks: bool = True) -> alt.TopLevelMixin:
    """``chart`` with every text in ``font_family`` unless its config names a font already; the
    rest of its config (view, legend) is kept (altair's ``configure`` would replace it)."""
    from altair import Undefined
    from altair.vegalite.v6 import schema

    copy = chart.copy(deep=["config"])  # type: ignore[attr-defined]
    if copy.config is Undefined:
        copy.config = schema.core.Config()
    if copy.config._get("font", Undefined) is Undefined:
        copy.config["font"] = font_family(fallbacks)
    return copy


def save_chart(
    chart: alt.TopLevelMixin,
    out_dir: Path,
    name: str,
    formats: Sequence[ChartFormat] = ("html", "png"),
    scale_factor: float = 2,
) -> list[Path]:
    """Save ``chart`` as ``out_dir/name.<fmt>``; HTML is self-contained (works offline), PNG is
    rendered at ``scale_factor`` × its CSS size. No file keeps the Hugging Face token."""
    from seqpatch.redact import redact_chart, redact_file

    chart = redact_chart(chart)  # labels may name a path that held the token
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        if fmt not in ("html", "png", "svg"):
            raise ChartError(f"unknown chart format {fmt!r}; use html, png or svg")
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        if fmt == "html":
            with_font(chart).save(path, inline=True)
        elif fmt == "png":
            with_font(chart, fallbacks=False).save(path, scale_factor=scale_factor)
        else:
            with_font(chart).save(path)
        redact_file(path)
        written.append(path)
    return written
