"""metrics.jsonl -> history, downsampling for XCom, the loss chart (PNG + self-contained HTML), RunResult."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_lora.core import results, storage
from airflow_provider_lora.core.results import RunResult, downsample, draw_loss_chart, load_run_result, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_row(step: int, steps_per_epoch: int = 10) -> dict:
    return {
        "step": step, "epoch": step / steps_per_epoch, "loss": 3.0 / (1 + 0.1 * step) + 0.05 * (step % 3),
        "grad_norm": 1.0, "learning_rate": 2e-4 * (1 - step / 1000), "tokens_per_second": 900.0,
        "num_tokens": 512 * step, "elapsed_seconds": 0.1 * step,
    }


def eval_row(step: int, steps_per_epoch: int = 10) -> dict:
    return {"step": step, "epoch": step / steps_per_epoch, "eval_loss": 2.5 / (1 + 0.05 * step),
            "elapsed_seconds": 0.1 * step}


def history_of(steps: int, eval_every: int = 10) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rows.append(train_row(step))
        if step % eval_every == 0:
            rows.append(eval_row(step))
    return rows


# ------------------------------------------------------------------------------------------------ read_metrics


def test_read_metrics_parses_rows_and_skips_blank_lines():
    text = json.dumps(train_row(1)) + "\n\n" + json.dumps(eval_row(1)) + "\n"
    assert read_metrics(text) == [train_row(1), eval_row(1)]
    assert read_metrics("") == []


@pytest.mark.parametrize("bad, why", [('{"step": 3, "loss": ', "not valid JSON"), ("[1, 2]", "not a JSON object")])
def test_read_metrics_names_the_malformed_line(bad, why):
    text = "\n".join([json.dumps(train_row(1)), json.dumps(train_row(2)), bad])
    with pytest.raises(ValueError, match=f"line 3 is {why}"):
        read_metrics(text)


# -------------------------------------------------------------------------------------------------- downsample


def test_short_history_is_returned_unchanged():
    history = history_of(20)
    assert downsample(history, 500) == history
    assert downsample(history, 500) is not history  # a copy: callers may append to it


def test_long_history_keeps_ends_and_every_eval_row_when_they_fit():
    history = history_of(2000, eval_every=50)  # 2000 training rows + 40 eval rows
    out = downsample(history, 100)
    assert len(out) == 100
    assert out[0] is history[0] and out[-1] is history[-1]  # history ends with an eval row at step 2000
    assert [r for r in out if "loss" in r][-1]["step"] == 2000
    assert [r for r in out if "eval_loss" in r] == [r for r in history if "eval_loss" in r]
    train_steps = [r["step"] for r in out if "loss" in r]
    gaps = {b - a for a, b in zip(train_steps, train_steps[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced


def test_too_many_eval_rows_are_spaced_evenly_beside_the_training_ends():
    history = history_of(300, eval_every=1)  # as many eval rows as training rows
    out = downsample(history, 50)
    train = [r for r in out if "loss" in r]
    assert len(out) == 50
    assert [r["step"] for r in train] == [1, 300]
    assert len([r for r in out if "eval_loss" in r]) == 48


def test_max_points_below_two_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        downsample(history_of(10), 1)


@settings(max_examples=300, deadline=None)
@given(kinds=st.lists(st.booleans(), max_size=400), max_points=st.integers(min_value=2, max_value=60))
def test_downsample_properties(kinds, max_points):
    history = [eval_row(i) if is_eval else train_row(i) for i, is_eval in enumerate(kinds)]
    out = downsample(history, max_points)

    assert len(out) <= max_points
    positions = [next(i for i, row in enumerate(history) if row is kept) for kept in out]
    assert positions == sorted(set(positions))  # a subsequence, original order, no duplicates
    train = [row for row in history if "loss" in row]
    if train:
        assert train[0] in out and train[-1] in out
    evals = [row for row in history if "eval_loss" in row]
    if len(evals) + min(len(train), 2) <= max_points:
        assert all(row in out for row in evals)
    if len(history) > max_points:
        assert len(out) == max_points  # the budget is used, not wasted


# ------------------------------------------------------------------------------------------------------- chart

TITLE = '<script>alert(1)</script> "Tom & Jerry" costs $5 and $6'


def draw(tmp_path, history, title=TITLE):
    png, page = tmp_path / "chart" / "loss.png", tmp_path / "chart" / "loss.html"
    draw_loss_chart(history, title=title, png_path=png, html_path=page)
    return png.read_bytes(), page.read_text(encoding="utf-8")


HOVER_SCRIPTS = ['<script type="application/json" id="chart-data">', "<script>"]


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    assert "src=" not in lowered and "<link" not in lowered
    assert "@import" not in lowered and "url(http" not in lowered
    # The only scripts are the page's own inline ones, the chart's data and its hover handler, and they load nothing.
    assert re.findall(r"<script[^>]*>", lowered) in ([], HOVER_SCRIPTS)
    for loader in ("fetch(", "xmlhttprequest", "import(", "websocket", "eventsource", "sendbeacon", ".src"):
        assert loader not in lowered
    # Any http(s) URL left may only be an XML namespace / RDF identifier inside the SVG, never a fetched resource.
    for match in re.finditer(r'(\S+)="https?://', page):
        assert match.group(1) in ("xmlns", "xmlns:xlink", "xmlns:dc", "xmlns:cc", "xmlns:rdf", "rdf:resource")


def test_chart_is_a_png_and_one_self_contained_html_page(tmp_path):
    history = history_of(60)
    png, page = draw(tmp_path, history)

    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 1 and "</svg>" in page
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert_self_contained(page)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &quot;Tom &amp; Jerry&quot; costs $5 and $6"
    assert f"<title>{escaped}</title>" in page and f"<h1>{escaped}</h1>" in page
    assert "<script>alert(1)" not in page

    # The table: one row per logged row, values formatted.
    assert page.count("<tr class=") == len(history)
    first = train_row(1)
    assert (f'<tr class="train"><td>1</td><td>0.100</td><td>{first["loss"]:.4f}</td><td></td>'
            f'<td>{first["learning_rate"]:.3e}</td></tr>') in page
    assert f'<tr class="eval"><td>10</td><td>1.000</td><td></td><td>{eval_row(10)["eval_loss"]:.4f}</td>' in page


def chart_data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def test_html_chart_carries_the_plotted_values_for_its_hover_readout(tmp_path):
    history = history_of(25)
    _, page = draw(tmp_path, history)
    assert '<div id="tip" role="status" hidden></div></figure>' in page
    assert re.findall(r"<script[^>]*>", page) == HOVER_SCRIPTS and page.endswith("</script>\n</body>\n</html>\n")
    for gid in ("train-points", "train-smooth", "eval-loss", "learning-rate", "legend"):
        assert page.count(f'<g id="{gid}">') == 1

    data = chart_data(page)
    points = {p[0]: p for p in data["points"]}
    assert sorted(points) == list(range(1, 26)) and [p[0] for p in data["points"]] == sorted(points)
    step_10, step_11 = points[10], points[11]
    assert step_10[:3] == [10, 1.0, train_row(10)["loss"]] and step_10[4] == train_row(10)["learning_rate"]
    assert step_10[5] == eval_row(10)["eval_loss"] and step_11[5] is None  # eval loss only where it was logged
    smooth = results._ema([train_row(s)["loss"] for s in range(1, 26)], results._ema_weight(25))
    assert [p[3] for p in data["points"]] == smooth

    # The plot area, in SVG units, is where the scatter put the points: the first and last at the x limits' ends.
    left, top, width, height = data["box"]
    scatter = re.search(r'<g id="train-points">.*?</g>\n   </g>', page, re.S).group(0)  # up to the group's end
    xs = [float(x) for x in re.findall(r'<use xlink:href="#\w+" x="([\d.]+)"', scatter)]
    assert len(xs) == 25
    (x0, x1), scale = data["x"], width / (data["x"][1] - data["x"][0])
    assert xs[0] == pytest.approx(left + (1 - x0) * scale, abs=0.01)
    assert xs[-1] == pytest.approx(left + (25 - x0) * scale, abs=0.01)
    assert data["y"][0] < min(p[2] for p in data["points"]) and data["lr"][0] < data["lr"][1]
    assert 0 < left and 0 < top and left + width < 648 and top + height < 345.6  # inside the 9 x 4.8 inch figure


def test_hover_json_cannot_end_its_script_early():
    text = results._script_json({"title": "</script><script>alert(1)</script> & <!--"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"title": "</script><script>alert(1)</script> & <!--"}
    with pytest.raises(ValueError):
        results._script_json([float("nan")])  # NaN is not JSON; JSON.parse would throw


def test_long_runs_hover_over_the_plotted_points_only(tmp_path):
    history = history_of(5000, eval_every=1000)
    _, page = draw(tmp_path, history, title="long")
    data = chart_data(page)
    assert len([p for p in data["points"] if p[2] is not None]) == results.MAX_PLOT_POINTS
    assert len(data["points"]) <= results.MAX_PLOT_POINTS + 5  # eval steps that no plotted training step shares
    assert data["points"][0][0] == 1 and data["points"][-1][0] == 5000
    assert [p[0] for p in data["points"] if p[5] is not None] == [1000, 2000, 3000, 4000, 5000]


def test_chart_draws_raw_and_smoothed_loss_eval_loss_lr_axis_and_epoch_marks():
    history = history_of(35)
    fig = results._figure(history, "t")
    loss_ax, lr_ax = fig.axes  # learning rate sits on a second y-axis
    assert lr_ax.get_ylabel() == "learning rate"
    labels = [line.get_label() for line in loss_ax.lines]
    assert "eval loss" in labels and any(label.startswith("training loss (EMA") for label in labels)
    assert len(loss_ax.collections) == 1  # the raw training-loss points
    epoch_lines = [line for line in loss_ax.lines if list(line.get_xdata()) in ([10, 10], [20, 20], [30, 30])]
    assert len(epoch_lines) == 3
    assert results._epoch_marks(history) == [(10, 1), (20, 2), (30, 3)]


def test_epoch_marks_tolerate_float_noise_and_the_ema_is_debiased():
    rows = [{"step": 1, "epoch": 0.5}, {"step": 2, "epoch": 0.9999999}, {"step": 3, "epoch": 1.5}]
    assert results._epoch_marks(rows) == [(2, 1)]
    assert results._ema([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards zero
    smooth = results._ema([4.0] * 10 + [1.0] * 10)
    assert 1.0 < smooth[-1] < smooth[10] < 4.0 + 1e-9
    # Short runs are smoothed less, so the line does not lag behind the points.
    assert results._ema_weight(5) == 0.0 and results._ema_weight(30) == 0.67 and results._ema_weight(10_000) == 0.9


@pytest.mark.parametrize(
    "history",
    [[], [{"step": 0, "epoch": 0.0, "elapsed_seconds": 0.1}], [{"step": 1, "loss": float("nan")}]],
    ids=["empty", "no-loss-rows", "only-nan"],
)
def test_chart_without_training_steps_says_so(tmp_path, history):
    png, page = draw(tmp_path, history, title="empty run")
    assert png.startswith(PNG_SIGNATURE)
    assert "<svg" in page and "<h1>empty run</h1>" in page
    assert_self_contained(page)
    if not history:
        assert '<td colspan="5">no training steps logged</td>' in page
    assert "<script" not in page and 'id="tip"' not in page  # nothing to hover
    fig = results._figure(history, "empty run")
    assert [t.get_text() for t in fig.axes[0].texts] == ["no training steps logged"]


def test_chart_with_only_eval_rows_or_nan_losses_still_draws(tmp_path):
    history = [eval_row(5), {**train_row(6), "loss": float("nan")}, train_row(7)]
    png, page = draw(tmp_path, history)
    assert png.startswith(PNG_SIGNATURE)
    assert "<td>nan</td>" in page  # the table shows what was logged


def test_long_history_table_is_capped_and_says_so(tmp_path):
    history = history_of(3000, eval_every=100)
    _, page = draw(tmp_path, history, title="long")
    assert page.count("<tr class=") == results.MAX_TABLE_ROWS
    assert f"Showing {results.MAX_TABLE_ROWS} of {len(history)} logged rows" in page
    assert len(page) < 3_000_000


def test_same_history_gives_the_same_html(tmp_path):
    _, first = draw(tmp_path / "a", history_of(30))
    _, second = draw(tmp_path / "b", history_of(30))
    assert first == second


# ------------------------------------------------------------------------------------------------- RunResult


def test_to_xcom_is_strict_json_with_a_downsampled_history():
    result = RunResult(
        summary={"final_loss": float("nan"), "steps": 1000, "losses": [1.0, float("inf")]},
        history=history_of(1000),
        artifacts={"root": "s3://b/run"},
    )
    xcom = result.to_xcom(max_points=50)
    json.dumps(xcom, allow_nan=False)  # NaN/inf would break XCom and KFP metadata
    assert xcom["summary"] == {"final_loss": None, "steps": 1000, "losses": [1.0, None]}
    assert len(xcom["history"]) == 50 and xcom["history"][0] == result.history[0]
    assert xcom["artifacts"] == {"root": "s3://b/run"}
    assert math.isnan(result.summary["final_loss"])  # the result itself is left as it was


def publish_fake_run(tmp_path, output_uri, history, merged=False):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    (run / "summary.json").write_text(json.dumps({"final_loss": history[-1]["loss"], "global_step": len(history)}))
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    if merged:
        (run / "merged").mkdir()
        (run / "merged" / "config.json").write_text("{}")
    draw_loss_chart(history, title="run", png_path=run / "loss_chart.png", html_path=run / "loss_chart.html")
    return storage.publish_run(run, output_uri)


def test_load_run_result_from_a_local_path(tmp_path):
    history = history_of(12)
    history = [row for row in history if "loss" in row]
    out = tmp_path / "published"
    artifacts = publish_fake_run(tmp_path, out, history, merged=True)

    result = load_run_result(out)
    assert result.history == history
    assert result.summary == {"final_loss": history[-1]["loss"], "global_step": 12}
    assert result.artifacts == artifacts and result.artifacts["merged"] == str(out / "merged")


def test_load_run_result_from_s3(tmp_path, s3_bucket):
    history = [train_row(step) for step in range(1, 6)]
    out = f"s3://{s3_bucket}/runs/r1"
    publish_fake_run(tmp_path, out, history)

    result = load_run_result(out)
    assert result.history == history
    assert result.artifacts["chart_html"] == f"{out}/loss_chart.html" and "merged" not in result.artifacts
    assert "<svg" in storage.read_text(result.artifacts["chart_html"])
    json.dumps(result.to_xcom(), allow_nan=False)


def test_load_run_result_without_marker_is_a_clear_error(tmp_path, s3_bucket):
    out = tmp_path / "half"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(storage.IncompleteRunError, match=rf"{out} holds no completed run: _COMPLETE is missing"):
        load_run_result(out)
    with pytest.raises(storage.IncompleteRunError, match=f"s3://{s3_bucket}/nothing"):
        load_run_result(f"s3://{s3_bucket}/nothing")


def test_importing_the_core_modules_loads_no_heavy_library():
    code = (
        "import sys, airflow_provider_lora.core.results, airflow_provider_lora.core.storage\n"
        "heavy = {'airflow', 'kfp', 'torch', 'transformers', 'datasets', 'matplotlib', 'boto3', 'botocore'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
