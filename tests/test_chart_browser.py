"""The HTML loss chart in a real browser: Debian's chromium, headless, driven by playwright-core from node.

Needs /usr/bin/chromium and tests/browser/node_modules, which ``.ci/install-browser.sh`` installs; skipped without
them. ``UPDATE_SCREENSHOTS=1`` also copies the screenshots to docs/images/: loss-chart-browser.png (the chart) and
what-you-get-back.png (the chart with an eval series and the before/after answers under it).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess

from airflow_provider_lora.core.results import draw_loss_chart
from tests.browser_helpers import BROWSER_DIR, ROOT, needs_browser, png_size

DOCS_SHOT = ROOT / "docs" / "images" / "loss-chart-browser.png"
RESULTS_SHOT = ROOT / "docs" / "images" / "what-you-get-back.png"
TITLE = "SmolLM2-135M-Instruct · LoRA r=16 α=32 · tickets_<v2>&fr.jsonl"  # '<' and '&' must show as text

STEPS, EPOCHS = 120, 3
PER_EPOCH = STEPS // EPOCHS


def realistic_history(eval_every: int = PER_EPOCH) -> list[dict]:
    """120 optimizer steps over 3 epochs, warm-up then linear decay, noisy falling loss, an eval row before the first
    step (the base model's, as the trainer logs it) and every ``eval_every`` steps (the default: per epoch; the
    spec's eval_steps sets another interval)."""
    rng = random.Random(7)
    rows = [{"step": 0, "epoch": 0.0, "eval_loss": 2.3, "elapsed_seconds": 0.2}]
    for step in range(1, STEPS + 1):
        lr = 2e-4 * min(step / 10, (STEPS - step) / (STEPS - 10))
        loss = 0.9 + 1.6 * math.exp(-step / 30) + rng.gauss(0, 0.08)
        rows.append({"step": step, "epoch": step / PER_EPOCH, "loss": loss, "grad_norm": 1.0 + rng.random(),
                     "learning_rate": lr, "tokens_per_second": 900.0, "num_tokens": 512 * step,
                     "elapsed_seconds": 0.5 * step})
        if step % eval_every == 0:
            rows.append({"step": step, "epoch": step / PER_EPOCH, "eval_loss": 1.0 + 1.3 * math.exp(-step / 40),
                         "elapsed_seconds": 0.5 * step + 0.2})
    return rows


pytestmark = needs_browser


def test_loss_chart_in_headless_chromium(tmp_path):
    history = realistic_history()
    page, png, shot = tmp_path / "loss_chart.html", tmp_path / "loss_chart.png", tmp_path / "browser.png"
    draw_loss_chart(history, title=TITLE, png_path=png, html_path=page)

    train = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval_loss" in row]
    hover_train, hover_eval = 57, 2  # step 58, and the eval row at step 80 (after those at steps 0 and 40)
    hovers = [{"selector": "#train-points use", "index": hover_train},
              {"selector": "#eval-loss use", "index": hover_eval}]
    proc = subprocess.run(["node", "chart.mjs", str(page), str(shot), json.dumps(hovers)], cwd=BROWSER_DIR,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])

    # Air-gapped and clean: the file itself is the only request, and nothing is logged as an error.
    assert seen["console_errors"] == []
    assert seen["requests"] == [page.as_uri()] and seen["blocked"] == [] and seen["failed"] == []

    assert seen["svg"] == 1
    assert seen["title"] == seen["heading"] == TITLE
    assert seen["legend"] == ["training loss", "training loss (EMA 0.9)", "eval loss", "learning rate"]
    assert seen["train_points"] == STEPS and seen["eval_points"] == 1 + EPOCHS
    assert seen["smooth_line"] == 1 and seen["lr_line"] == 1
    assert len(seen["table_steps"]) == len(history)
    assert seen["tip_hidden_before"] is True

    # Hovering a training point shows that step's values, and the page rings the point that was hovered.
    row = train[hover_train]
    tip = seen["tooltips"][0]
    assert tip["text"][0] == f"step {row['step']} · epoch {row['epoch']:.2f}"
    assert f"training loss {row['loss']:.4f}" in tip["text"]
    assert f"learning rate {row['learning_rate']:.3e}" in tip["text"]
    assert not any(line.startswith("eval loss") for line in tip["text"])
    assert tip["ring_offset"] < 1.5
    # An eval point: the eval loss and the training loss logged at that step.
    ev = evals[hover_eval]
    tip = seen["tooltips"][1]
    assert tip["text"][0] == f"step {ev['step']} · epoch {ev['epoch']:.2f}"
    assert f"eval loss {ev['eval_loss']:.4f}" in tip["text"]
    assert f"training loss {train[ev['step'] - 1]['loss']:.4f}" in tip["text"]
    assert tip["ring_offset"] < 1.5

    data = shot.read_bytes()
    width, height = png_size(data)
    assert width == 1000 and 450 < height < 720 and len(data) > 30_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SHOT)


# Held-out support tickets answered greedily by the base model and by the adapter, as summary["samples"] holds them:
# the prompt as the user wrote it (the chat template's framing left out), the base model rambling, the adapter to the
# point. The second ticket was pasted from an HTML mail: its markup and entity must show as typed, not be parsed.
SAMPLES = [
    {"prompt": "How do I reset my password?",
     "expected": "Go to Settings → Account → Reset password. We email you a link that works for 24 hours.",
     "base": "Resetting a password is an important step in keeping your account secure. There are many reasons why "
             "you might want to reset your password, such as",
     "with_adapter": "Go to Settings → Account → Reset password; we email you a link valid for 24 hours."},
    {"prompt": "My invoice #2231 shows <b>VAT</b> twice &amp; the total is off. Why?",
     "expected": "One VAT line is for the plan, the other for the extra seats; the total is correct.",
     "base": "An invoice is a document that lists the goods or services a seller provides & the amount owed.",
     "with_adapter": "One VAT line is the plan's, the other the extra seats'; the total is right."},
    {"prompt": "Can I export my tickets to CSV?",
     "expected": "Yes: Reports → Export → CSV. Exports over 10,000 rows arrive by email.",
     "base": "Yes, you can export your tickets to CSV. To do this, you will need to open the",
     "with_adapter": "Yes: Reports → Export → CSV; large exports are emailed to you."},
]
EVAL_EVERY = 20  # eval_steps=20: six held-out evaluations over the 120 steps, after the one at step 0


def test_eval_series_and_before_after_answers_in_headless_chromium(tmp_path):
    history = realistic_history(eval_every=EVAL_EVERY)
    evals = [row for row in history if "eval_loss" in row]
    page, png, shot = tmp_path / "loss_chart.html", tmp_path / "loss_chart.png", tmp_path / "results.png"
    title = "SmolLM2-135M-Instruct · LoRA r=16 α=32 · support_tickets.jsonl"
    draw_loss_chart(history, title=title, png_path=png, html_path=page, samples=SAMPLES)

    hover_eval = 4  # the eval at step 80
    proc = subprocess.run(["node", "chart.mjs", str(page), str(shot),
                           json.dumps([{"selector": "#eval-loss use", "index": hover_eval}]), "table.samples"],
                          cwd=BROWSER_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["console_errors"] == [] and seen["blocked"] == [] and seen["failed"] == []

    # The eval series: in the legend, a marker per eval, evenly spaced along the steps (every 20), each lower on the
    # screen than the one before as the eval loss falls; hovering one shows its eval loss.
    assert "eval loss" in seen["legend"] and seen["eval_points"] == len(evals) == 1 + STEPS // EVAL_EVERY
    xs, ys = zip(*seen["eval_centres"])
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    assert min(gaps) > 40 and max(gaps) - min(gaps) < 1.5
    assert all(b > a for a, b in zip(ys, ys[1:]))
    tip = seen["tooltips"][0]["text"]
    assert tip[0] == f"step {evals[hover_eval]['step']} · epoch {evals[hover_eval]['epoch']:.2f}"
    assert f"eval loss {evals[hover_eval]['eval_loss']:.4f}" in tip
    assert len(seen["table_steps"]) == len(history)  # the table of logged values holds the eval rows too

    # The before/after table, right under the chart: every answer as text (markup and entities as typed, no element
    # parsed out of them), every row shown, and nothing wider than the page.
    table = seen["samples"]
    assert table["heading"] == "Held-out prompts, before and after"
    assert table["headers"] == ["prompt", "expected", "base model", "with the adapter"]
    assert [row["cells"] for row in table["rows"]] == [
        [s["prompt"], s["expected"], s["base"], s["with_adapter"]] for s in SAMPLES]
    assert table["elements_in_cells"] == []
    assert all(row["visible"] and row["box"]["height"] >= 30 for row in table["rows"])
    figure = seen["figure_box"]
    assert figure["y"] + figure["height"] <= table["box"]["y"] < figure["y"] + figure["height"] + 120
    assert table["box"]["x"] + table["box"]["width"] <= 1000 and seen["page_width"] <= 1000

    # The screenshot runs from the title to the end of the answers: the docs' picture of what a run hands back.
    data = shot.read_bytes()
    width, height = png_size(data)
    assert width == 1000 and height > figure["y"] + figure["height"] + 150 and 30_000 < len(data) < 300_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        RESULTS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, RESULTS_SHOT)
