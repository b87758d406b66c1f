"""What a finished run hands back: its loss history, summary, artifact URIs and loss chart.

``metrics.jsonl`` holds one JSON object per log event, as the trainer writes them:

- training rows: ``{"step", "epoch", "loss", "grad_norm", "learning_rate", "tokens_per_second", "num_tokens",
  "elapsed_seconds"}``
- eval rows: ``{"step", "epoch", "eval_loss", "elapsed_seconds"}``

matplotlib is imported only inside :func:`draw_loss_chart`, so the Airflow side can import this module for free.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_lora.core import storage
from airflow_provider_lora.core.contract import (ARTIFACTS_KEY, HISTORY_KEY, METRICS_FILE, SUMMARY_FILE, SUMMARY_KEY,
                                                 TERMINATION_MESSAGE_BYTES, TERMINATION_SUMMARY_KEYS)

# Points drawn per series and rows in the HTML table: enough to see the curve, small enough that a 100k-step run
# still gives a chart of a few hundred KB.
MAX_PLOT_POINTS = 2000
MAX_TABLE_ROWS = 1000
MAX_EPOCH_LABELS = 8
EMA_WEIGHT = 0.9
NO_STEPS = "no training steps logged"


def read_metrics(text: str) -> list[dict]:
    """Parse metrics.jsonl; blank lines are skipped, anything else that is not a JSON object is an error."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"metrics.jsonl line {number} is not valid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"metrics.jsonl line {number} is not a JSON object: {line.strip()[:80]!r}")
        rows.append(row)
    return rows


def _is_eval(row: dict) -> bool:
    return "eval_loss" in row


def _evenly(indices: list[int], k: int) -> list[int]:
    """``k`` evenly spaced items of ``indices``, first and last included when ``k >= 2``."""
    n = len(indices)
    if k >= n:
        return indices
    if k <= 0:
        return []
    if k == 1:
        return [indices[-1]]
    # Spacing is >= 1 because k < n, so rounding never picks the same index twice.
    return [indices[round(i * (n - 1) / (k - 1))] for i in range(k)]


def downsample(history: list[dict], max_points: int = 500) -> list[dict]:
    """At most ``max_points`` rows, in their original order, for XCom and tables.

    Keeps the first and last training rows; keeps every eval row if they fit beside those two, else spaces them
    evenly; fills the rest of the budget with evenly spaced training rows.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    if len(history) <= max_points:
        return list(history)
    evals = [i for i, row in enumerate(history) if _is_eval(row)]
    trains = [i for i, row in enumerate(history) if not _is_eval(row)]
    ends = min(len(trains), 2)  # the first and last training rows are always kept
    eval_keep = _evenly(evals, max_points - ends)
    train_keep = _evenly(trains, max_points - len(eval_keep))
    return [history[i] for i in sorted(eval_keep + train_keep)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have a finite ``key`` and a step."""
    pairs = [(row["step"], row[key]) for row in history if _finite(row.get(key)) and _finite(row.get("step"))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _ema_weight(n: int) -> float:
    """Smooth over about a tenth of the run (a fixed 0.9 lags far behind a 30-step run), at most EMA_WEIGHT."""
    return round(min(EMA_WEIGHT, max(0.0, 1 - 10 / max(n, 1))), 2)


def _ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards zero (as TensorBoard does)."""
    out, avg = [], 0.0
    for t, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**t))
    return out


def _epoch_marks(history: list[dict]) -> list[tuple[float, int]]:
    """(step, epoch) where the logged epoch reaches a new integer, i.e. where an epoch ends."""
    marks, previous = [], None
    for row in sorted((r for r in history if _finite(r.get("epoch")) and _finite(r.get("step"))),
                      key=lambda r: r["step"]):
        current = math.floor(row["epoch"] + 1e-6)  # trainers log 0.9999999 for 1.0
        if previous is not None and current > previous:
            marks.append((row["step"], current))
        previous = current
    return marks


def _thin(steps: list[float], values: list[float], limit: int = MAX_PLOT_POINTS) -> tuple[list[float], list[float]]:
    keep = _evenly(list(range(len(steps))), limit)
    return [steps[i] for i in keep], [values[i] for i in keep]


def _figure(history: list[dict], title: str) -> Any:
    # A bare Figure, not pyplot: no global backend switch and no state shared between threads.
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.add_subplot()
    # parse_math=False: a '$' in a user's title must not be read as mathtext (which can fail to parse).
    ax.set_title(title, parse_math=False)
    steps, losses = _series(history, "loss")
    eval_steps, eval_losses = _series(history, "eval_loss")
    if not steps and not eval_steps:
        ax.text(0.5, 0.5, NO_STEPS, ha="center", va="center", transform=ax.transAxes, fontsize=14, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return fig

    # Each series gets an SVG id (gid), so the HTML page and its tests can find its points.
    if steps:
        weight = _ema_weight(len(losses))
        ax.scatter(*_thin(steps, losses), s=6, alpha=0.35, color="tab:blue", label="training loss",
                   gid="train-points")
        ax.plot(*_thin(steps, _ema(losses, weight)), color="tab:blue", linewidth=2,
                label=f"training loss (EMA {weight:g})", gid="train-smooth")
    if eval_steps:
        ax.plot(*_thin(eval_steps, eval_losses), "o-", color="tab:orange", markersize=4, label="eval loss",
                gid="eval-loss")
    marks = _epoch_marks(history)
    label_every = math.ceil(len(marks) / MAX_EPOCH_LABELS) if marks else 1  # labels must not overlap
    for n, (step, epoch) in enumerate(marks):
        ax.axvline(step, color="0.6", linestyle=":", linewidth=1)
        if (n + 1) % label_every == 0:
            ax.annotate(f"epoch {epoch}", xy=(step, 1), xycoords=("data", "axes fraction"), xytext=(-2, -10),
                        textcoords="offset points", fontsize=8, color="0.4", ha="right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)

    handles, labels = ax.get_legend_handles_labels()
    lr_steps, lrs = _series(history, "learning_rate")
    if lr_steps:
        ax_lr = ax.twinx()
        (line,) = ax_lr.plot(*_thin(lr_steps, lrs), "--", color="tab:green", linewidth=1, label="learning rate",
                             gid="learning-rate")
        ax_lr.set_ylabel("learning rate")
        # Full numbers on the ticks: matplotlib's "1e-4" offset text would sit on top of the title.
        ax_lr.yaxis.set_major_formatter(StrMethodFormatter("{x:.2e}"))
        handles, labels = handles + [line], labels + ["learning rate"]
    # Below the axes, where it hides no curve and no epoch label.
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.legends[0].set_gid("legend")
    return fig


def _hover_data(fig: Any, history: list[dict]) -> dict | None:
    """What the page's hover script needs: the plot area in SVG units, the axis limits, and one row per plotted
    step ``[step, epoch, loss, smoothed loss, learning rate, eval loss]`` (None where a row has no such value).

    Read after the SVG is drawn: constrained layout places the axes during that draw. The axes are linear.
    """
    if len(fig.axes) == 0 or not fig.axes[0].has_data():
        return None
    ax = fig.axes[0]
    width, height = (float(v) * 72 for v in fig.get_size_inches())  # SVG user units are points
    x0, y0, w, h = ax.get_position().bounds  # figure fractions, measured from the bottom left
    points: dict[float, list] = {}

    def point(row: dict) -> list:
        step = row["step"]
        epoch = row["epoch"] if _finite(row.get("epoch")) else None
        return points.setdefault(step, [step, epoch, None, None, None, None])

    train = [r for r in history if _finite(r.get("loss")) and _finite(r.get("step"))]
    smooth = _ema([r["loss"] for r in train], _ema_weight(len(train)))
    for i in _evenly(list(range(len(train))), MAX_PLOT_POINTS):  # the rows _figure scatters, no others
        row = point(train[i])
        row[2], row[3] = train[i]["loss"], smooth[i]
        if _finite(train[i].get("learning_rate")):
            row[4] = train[i]["learning_rate"]
    evals = [r for r in history if _finite(r.get("eval_loss")) and _finite(r.get("step"))]
    for i in _evenly(list(range(len(evals))), MAX_PLOT_POINTS):
        point(evals[i])[5] = evals[i]["eval_loss"]
    return {
        "box": [round(x0 * width, 3), round((1 - y0 - h) * height, 3), round(w * width, 3), round(h * height, 3)],
        "x": [float(v) for v in ax.get_xlim()],
        "y": [float(v) for v in ax.get_ylim()],
        "lr": [float(v) for v in fig.axes[1].get_ylim()] if len(fig.axes) > 1 else None,
        "points": [points[step] for step in sorted(points)],
    }


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    return format(value, fmt) if _finite(value) else html.escape(str(value))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table.samples td { vertical-align: top; max-width: 24rem; }
table.samples th, table.samples td { text-align: left; }
table.samples pre { white-space: pre-wrap; margin: 0; font-size: 0.85rem; }
h1 { font-size: 1.3rem; }
figure { margin: 0; max-width: 960px; position: relative; }
figure svg { width: 100%; height: auto; }
#tip { position: absolute; pointer-events: none; background: #fffffff2; border: 1px solid #bbb; border-radius: 4px;
       padding: 0.3rem 0.5rem; font-size: 0.8rem; line-height: 1.4; white-space: nowrap; }
#tip span { display: inline-block; width: 0.7em; height: 0.7em; margin-right: 0.4em; }
table { border-collapse: collapse; font-size: 0.85rem; margin-top: 1rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
tr.eval td { background: #fff6ea; }
.note { color: #666; font-size: 0.85rem; }
"""


# Hovering the plot shows the nearest plotted step's values in #tip and rings its points. Plain DOM, no library;
# the values come from the JSON above it and are written with textContent, so nothing in them is parsed as HTML.
_HOVER_JS = r"""
(() => {
  const data = JSON.parse(document.getElementById("chart-data").textContent);
  const figure = document.querySelector("figure"), svg = figure.querySelector("svg");
  const tip = document.getElementById("tip"), points = data.points;
  const [left, top, width, height] = data.box;
  const sx = (step) => left + (step - data.x[0]) / (data.x[1] - data.x[0]) * width;
  const sy = (v, [lo, hi]) => top + (hi - v) / (hi - lo) * height;
  const layer = svg.appendChild(document.createElementNS("http://www.w3.org/2000/svg", "g"));
  layer.id = "hover";
  layer.style.display = "none";
  const shape = (tag, attrs) => {
    const el = layer.appendChild(document.createElementNS("http://www.w3.org/2000/svg", tag));
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    return el;
  };
  const guide = shape("line", {y1: top, y2: top + height, stroke: "#666", "stroke-width": 0.8});
  const loss = (v) => v.toFixed(4);
  const rate = (v) => v.toExponential(3).replace(/e([+-])(\d)$/, (_, sign, d) => `e${sign}0${d}`);
  // [column in a point, label, colour, format, y limits]
  const series = [
    [2, "training loss", "#1f77b4", loss, data.y],
    [3, "smoothed", "#1f77b4", loss, data.y],
    [5, "eval loss", "#ff7f0e", loss, data.y],
    [4, "learning rate", "#2ca02c", rate, data.lr],
  ].map(([col, label, colour, format, limits]) => ({col, label, colour, format, limits,
    ring: limits && shape("circle", {r: 4.5, fill: "none", stroke: colour, "stroke-width": 1.5})}));

  function nearest(step) {  // points are sorted by step
    let lo = 0, hi = points.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (points[mid][0] < step) lo = mid + 1; else hi = mid;
    }
    return lo > 0 && step - points[lo - 1][0] < points[lo][0] - step ? points[lo - 1] : points[lo];
  }

  function hide() { layer.style.display = "none"; tip.hidden = true; }

  svg.addEventListener("pointermove", (event) => {
    const at = new DOMPoint(event.clientX, event.clientY).matrixTransform(svg.getScreenCTM().inverse());
    if (at.x < left || at.x > left + width || at.y < top || at.y > top + height) return hide();
    const p = nearest(data.x[0] + (at.x - left) / width * (data.x[1] - data.x[0]));
    guide.setAttribute("x1", sx(p[0]));
    guide.setAttribute("x2", sx(p[0]));
    const head = document.createElement("b");
    head.textContent = `step ${p[0]}` + (p[1] === null ? "" : ` \u00b7 epoch ${p[1].toFixed(2)}`);
    const lines = [head];
    for (const s of series) {
      const v = p[s.col];
      if (s.ring) s.ring.style.display = v === null ? "none" : "";
      if (v === null) continue;
      if (s.ring) { s.ring.setAttribute("cx", sx(p[0])); s.ring.setAttribute("cy", sy(v, s.limits)); }
      const line = document.createElement("div"), swatch = document.createElement("span");
      swatch.style.background = s.colour;
      line.append(swatch, `${s.label} ${s.format(v)}`);
      lines.push(line);
    }
    tip.replaceChildren(...lines);
    layer.style.display = "";
    tip.hidden = false;
    const box = figure.getBoundingClientRect(), x = event.clientX - box.left, y = event.clientY - box.top;
    tip.style.left = `${x > box.width * 0.6 ? x - tip.offsetWidth - 14 : x + 14}px`;
    tip.style.top = `${Math.min(y + 14, box.height - tip.offsetHeight)}px`;
  });
  svg.addEventListener("pointerleave", hide);
})();
"""


def _script_json(value: Any) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&', so no '</script>' or '<!--' can end it early."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _samples_table(samples: list[dict] | None) -> str:
    """Held-out prompts side by side: the expected answer, the base model's and the adapter's (greedy)."""
    if not samples:
        return ""
    cells = "\n".join("<tr>" + "".join(f"<td><pre>{html.escape(str(s.get(k, '')))}</pre></td>"
                                       for k in ("prompt", "expected", "base", "with_adapter")) + "</tr>" for s in samples)
    return (f'<h2>Held-out prompts, before and after</h2>\n<table class="samples">\n<thead><tr><th>prompt</th>'
            f"<th>expected</th><th>base model</th><th>with the adapter</th></tr></thead>\n<tbody>\n{cells}\n"
            "</tbody>\n</table>\n")


def _html(history: list[dict], title: str, svg: str, hover: dict | None = None,
          samples: list[dict] | None = None) -> str:
    rows = downsample(history, MAX_TABLE_ROWS) if len(history) > MAX_TABLE_ROWS else history
    note = (f'<p class="note">Showing {len(rows)} of {len(history)} logged rows, evenly spaced.</p>'
            if len(rows) < len(history) else "")
    body = "\n".join(
        f'<tr class="{"eval" if _is_eval(r) else "train"}"><td>{_cell(r, "step", "d")}</td>'
        f'<td>{_cell(r, "epoch", ".3f")}</td><td>{_cell(r, "loss", ".4f")}</td>'
        f'<td>{_cell(r, "eval_loss", ".4f")}</td><td>{_cell(r, "learning_rate", ".3e")}</td></tr>'
        for r in rows
    ) or f'<tr><td colspan="5">{NO_STEPS}</td></tr>'
    esc = html.escape(title)
    tip, script = "", ""
    if hover is not None:
        tip = '<div id="tip" role="status" hidden></div>'
        script = (f'<script type="application/json" id="chart-data">{_script_json(hover)}</script>\n'
                  f"<script>{_HOVER_JS}</script>\n")
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{esc}</title><style>{_CSS}</style></head>
<body>
<h1>{esc}</h1>
<figure>{svg}{tip}</figure>
{_samples_table(samples)}{note}<table>
<thead><tr><th>step</th><th>epoch</th><th>loss</th><th>eval loss</th><th>learning rate</th></tr></thead>
<tbody>
{body}
</tbody>
</table>
{script}</body>
</html>
"""


def draw_loss_chart(history: list[dict], *, title: str, png_path: str | os.PathLike,
                    html_path: str | os.PathLike, samples: list[dict] | None = None) -> None:
    """Draw the loss chart as a PNG and as one self-contained HTML page (inline SVG, CSS and script, no external
    resource: it must open air-gapped and inside Airflow's and KFP's sandboxed iframes). Hovering the HTML chart
    shows the nearest step's values; without scripts the page is still the chart plus the table of values.
    ``samples`` (the summary's held-out prompts answered before and after training) go in a table right under it,
    above the table of logged values: the answers are what a reader judges the run by."""
    import matplotlib

    # Text as paths: the SVG needs no font; fixed hash salt and no date: the same history gives the same file.
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "airflow-provider-lora"}):
        fig = _figure(history, title)
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path, format="png", dpi=110)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
        hover = _hover_data(fig, history)  # after the SVG draw, which placed the axes
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE, which are invalid inside HTML
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    Path(html_path).write_text(_html(history, title, svg, hover, samples), encoding="utf-8")


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON (XCom and the KFP metadata reject them): they become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class RunResult:
    """A finished run: ``summary.json``, the metrics history and the URIs of everything published."""

    summary: dict
    history: list[dict] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_xcom(self, max_points: int = 500) -> dict:
        """A JSON-serialisable dict with the history downsampled to ``max_points`` rows."""
        return _json_safe({
            SUMMARY_KEY: self.summary,
            HISTORY_KEY: downsample(self.history, max_points),
            ARTIFACTS_KEY: dict(self.artifacts),
        })


def load_run_result(output_uri: str | os.PathLike, *, client: Any = None,
                    endpoint_url: str | None = None) -> RunResult:
    """Read a published run back; :class:`storage.IncompleteRunError` if it has no completion marker."""
    marker = storage.read_marker(output_uri, client=client, endpoint_url=endpoint_url)
    files = marker.get("files", {})

    def read(name: str) -> str | None:
        if name not in files:
            return None
        return storage.read_text(storage.join(output_uri, name), client=client, endpoint_url=endpoint_url)

    summary_text, metrics_text = read(SUMMARY_FILE), read(METRICS_FILE)
    return RunResult(
        summary=json.loads(summary_text) if summary_text is not None else {},
        history=read_metrics(metrics_text) if metrics_text is not None else [],
        artifacts=storage.artifact_uris(output_uri, files),
    )


# ---- the result on its way back to the launcher -------------------------------------------------------------------

XCOM_HISTORY_POINTS = 500  # the most loss-history rows a result carries through a trigger event or XCom
# The termination message's size and headline keys, and TASK_ENV, are defined in core/contract.py.


def bounded_result(result: Any) -> dict | None:
    """A result line's JSON as a launcher may carry it (a trigger event, XCom): the summary, at most
    XCOM_HISTORY_POINTS history rows, the artifacts; None when it is no result."""
    if not isinstance(result, dict) or not isinstance(result.get(SUMMARY_KEY), dict):
        return None
    history = [row for row in result.get(HISTORY_KEY) or [] if isinstance(row, dict)]
    return _json_safe({SUMMARY_KEY: result[SUMMARY_KEY], HISTORY_KEY: downsample(history, XCOM_HISTORY_POINTS),
                       ARTIFACTS_KEY: dict(result.get(ARTIFACTS_KEY) or {})})


def termination_message(result: dict, limit: int = TERMINATION_MESSAGE_BYTES) -> str:
    """The headline result as JSON of at most ``limit`` bytes. A long output URI makes the artifact URIs too long:
    then only the root goes, then none (the launcher knows the output URI); the text itself is never cut, so it
    always parses."""
    summary = {k: (result.get(SUMMARY_KEY) or {}).get(k) for k in TERMINATION_SUMMARY_KEYS}
    artifacts = dict(result.get(ARTIFACTS_KEY) or {})
    candidates = [{SUMMARY_KEY: summary, ARTIFACTS_KEY: artifacts}]
    if "root" in artifacts:
        candidates.append({SUMMARY_KEY: summary, ARTIFACTS_KEY: {"root": artifacts["root"]}})
    candidates.append({SUMMARY_KEY: summary})
    for candidate in candidates:
        text = json.dumps(_json_safe(candidate))  # ASCII: one byte per character
        if len(text) <= limit:
            return text
    return json.dumps({SUMMARY_KEY: {}})


def redacted_spec(spec: Any) -> dict:
    """The spec as recorded in artifacts: env values may be secrets, so only their names are kept."""
    from airflow_provider_lora.core.spec import format_key_values

    values = spec.model_dump()
    values["envs"] = format_key_values({k: "<redacted>" for k in spec.env_vars})
    return values


# Fields that may differ between two tries of one task without making their runs different: a retry resumes from
# the checkpoint of an earlier one.
_TRY_FIELDS = ("resume_from_checkpoint", "overwrite_output")


def is_own_run(summary: dict, spec: Any, task: dict) -> bool:
    """Whether a published run's summary says it was trained from ``spec`` for the task instance ``task`` (any of
    its tries): a retry may return it instead of refusing the output it already published."""
    recorded = summary.get("spec")
    if not isinstance(recorded, dict) or summary.get("task") != task:
        return False
    ours = json.loads(json.dumps(redacted_spec(spec), default=str))  # as summary.json holds it
    keys = (set(recorded) | set(ours)) - set(_TRY_FIELDS)
    return all(recorded.get(k) == ours.get(k) for k in keys)
