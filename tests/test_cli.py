"""The trainer CLI's argument handling (no training): flags come from LoRASpec, values are validated by it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_lora.core.spec import LoRASpec
from lora_trainer.__main__ import build_parser, flag_name, main, spec_from_args

REPO = Path(__file__).resolve().parents[1]


def _run(code_or_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "trainer")])}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=env)


def test_a_flag_for_every_field():
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in LoRASpec.model_fields:
        assert flag_name(name) in flags
        assert flag_name(name).startswith("--") and "_" not in flag_name(name)
    assert "--lora-r" in flags and "--base-model" in flags and "--spec" in flags


def test_bool_fields_have_negative_flags():
    flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    for name in ("lora_use_rslora", "checkpoint_at_epoch", "save_merged", "train_on_inputs"):
        assert "--no-" + flag_name(name)[2:] in flags
    assert "--no-lora-r" not in flags


def test_no_flags_give_the_default_spec():
    assert spec_from_args(build_parser().parse_args([])) == LoRASpec()


def test_flags_parsed_into_types():
    args = build_parser().parse_args(["--lora-r", "8", "--lora-use-rslora", "--no-checkpoint-at-epoch",
                                      "--learning-rate", "1e-4", "--resource-num-procs-per-worker", "auto",
                                      "--envs", "A=1\\,2", "--dataset-format", "alpaca"])
    spec = spec_from_args(args)
    assert spec.lora_r == 8 and type(spec.lora_r) is int
    assert spec.lora_use_rslora is True
    assert spec.checkpoint_at_epoch is False
    assert spec.learning_rate == 1e-4 and type(spec.learning_rate) is float
    assert spec.env_vars == {"A": "1,2"}
    assert spec.dataset_format == "alpaca"
    assert spec.lora_alpha == 32  # untouched: the spec default


def test_spec_file_with_overriding_flag(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"lora_r": 32, "learning_rate": 5e-5, "lora_load_in_4bit": True}))
    spec = spec_from_args(build_parser().parse_args(["--spec", str(path), "--lora-r", "4", "--no-lora-load-in-4bit"]))
    assert spec.lora_r == 4  # the flag wins
    assert spec.learning_rate == 5e-5  # the file's value stays
    assert spec.lora_load_in_4bit is False and spec.lora_bnb_4bit_quant_type is None


def test_spec_file_from_to_json(tmp_path):
    spec = LoRASpec.parse({"lora_r": 8, "lora_load_in_4bit": True, "seed": 1})
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    assert spec_from_args(build_parser().parse_args(["--spec", str(path)])) == spec


def test_unreadable_spec_file(tmp_path, capsys):
    assert main(["--spec", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["--spec", str(tmp_path / "bad.json")]) == 2
    assert "cannot read a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--lora-r", "0"], ["lora_r=0", ">= 1"]),
    (["--learning-rate", "fast"], ["learning_rate='fast'", "valid number"]),
    (["--resource-memory-per-worker", "32GB"], ["resource_memory_per_worker='32GB'", "32Gi"]),
    (["--fsdp-sharding-strategy", "FULL_SHARD"], ["fsdp_sharding_strategy='FULL_SHARD'", "DDP"]),
    (["--lora-r", "0", "--lora-dropout", "1"], ["lora_r=0", "lora_dropout=1.0"]),
], ids=["lora-r-zero", "lr-text", "memory-GB", "fsdp-full-shard", "two-bad"])
def test_bad_flag_value_exits_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-train: invalid LoRA training parameters")
    for part in expected:
        assert part in err


def test_unknown_flag_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--lora-rank", "8"])
    assert info.value.code == 2
    assert "--lora-rank" in capsys.readouterr().err


def test_bad_value_returns_before_importing_torch():
    proc = _run(["-c", "import sys, lora_trainer.__main__ as m; rc = m.main(['--lora-r', '0']); "
                       "print(rc, 'torch' in sys.modules)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "False"]
    assert "lora_r=0" in proc.stderr


def test_help_lists_flags():
    proc = _run(["-m", "lora_trainer", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--base-model" in proc.stdout
    for name in LoRASpec.model_fields:
        assert flag_name(name) in proc.stdout


def test_parser_imports_no_torch():
    proc = _run(["-c", "import sys, lora_trainer.__main__ as m; m.build_parser(); "
                       "print('torch' in sys.modules, 'transformers' in sys.modules, 'airflow' in sys.modules)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False"]
