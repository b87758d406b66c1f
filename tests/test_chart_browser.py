"""The HTML loss chart in a real browser: Debian's chromium, headless, driven by playwright-core from node.

Needs /usr/bin/chromium and tests/browser/node_modules, which ``.ci/install-browser.sh`` installs; skipped without
them. ``UPDATE_SCREENSHOTS=1`` also copies the screenshot to docs/images/loss-chart-browser.png.
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
TITLE = "SmolLM2-135M-Instruct · LoRA r=16 α=32 · tickets_<v2>&fr.jsonl"  # '<' and '&' must show as text

STEPS, EPOCHS = 120, 3
PER_EPOCH = STEPS // EPOCHS


def realistic_history() -> list[dict]:
    """120 optimizer steps over 3 epochs, warm-up then linear decay, noisy falling loss, an eval row per epoch."""
    rng, rows = random.Random(7), []
    for step in range(1, STEPS + 1):
        lr = 2e-4 * min(step / 10, (STEPS - step) / (STEPS - 10))
        loss = 0.9 + 1.6 * math.exp(-step / 30) + rng.gauss(0, 0.08)
        rows.append({"step": step, "epoch": step / PER_EPOCH, "loss": loss, "grad_norm": 1.0 + rng.random(),
                     "learning_rate": lr, "tokens_per_second": 900.0, "num_tokens": 512 * step,
                     "elapsed_seconds": 0.5 * step})
        if step % PER_EPOCH == 0:
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
    hover_train, hover_eval = 57, 1  # step 58, and the eval row at step 80
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
    assert seen["train_points"] == STEPS and seen["eval_points"] == EPOCHS
    assert seen["smooth_line"] == 1 and seen["lr_line"] == 1
    assert seen["table_rows"] == len(history)
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
