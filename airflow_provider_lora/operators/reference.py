"""The operator reference (docs/operator.md), generated from LoRATrainingOperator's own signature and docstring.

``python -m airflow_provider_lora.operators.reference`` rewrites docs/operator.md; ``--check`` only compares (exit 1
when the file is stale); a test asserts the committed page equals what this module generates. It imports the
operator, hence Airflow, which is why it is not in core/ (core/docs.py writes the spec's docs/parameters.md).
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from airflow_provider_lora import get_provider_info
from airflow_provider_lora.core.docs import write_or_check
from airflow_provider_lora.core.results import TERMINATION_MESSAGE_BYTES, XCOM_HISTORY_POINTS
from airflow_provider_lora.core.storage import artifact_uris
from airflow_provider_lora.links import CHART_XCOM_KEY
from airflow_provider_lora.core.render import PodOptions
from airflow_provider_lora.operators.lora import POD_FIELDS, SPEC_FIELDS, XCOM_LAUNCHED, LoRATrainingOperator

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "operator.md"
COMMAND = "python -m airflow_provider_lora.operators.reference"
_PARAM = re.compile(r"^:param (?P<names>[\w, ]+):\s*(?P<text>.*)$", re.DOTALL)


@dataclass
class Argument:
    name: str
    annotation: str
    default: str
    doc: str  # markdown
    templated: bool


def param_docs() -> dict[str, str]:
    """``:param a, b: text`` entries of the class docstring, by name (a grouped entry documents each name)."""
    entries: list[str] = []  # one string per :param entry, its continuation lines joined
    open_entry = False
    for line in inspect.getdoc(LoRATrainingOperator).splitlines():
        if line.startswith(":param "):
            entries.append(line)
            open_entry = True
        elif open_entry and line.startswith(" ") and line.strip():
            entries[-1] += " " + line.strip()
        else:
            open_entry = False  # a blank or unindented line ends an entry
    docs: dict[str, str] = {}
    for entry in entries:
        match = _PARAM.match(entry)
        assert match, f"unparsable docstring entry: {entry!r}"
        for name in match.group("names").split(","):
            docs[name.strip()] = match.group("text")
    return {name: _markdown(text) for name, text in docs.items()}


def _markdown(text: str) -> str:
    return text.replace("``", "`")


def _config_defaults() -> dict[str, str]:
    """Arguments whose default is read from the Airflow configuration at import, e.g.
    ``conf.getboolean("operators", "default_deferrable", fallback=False)``: the page names the option, not the value
    of the machine that generated it."""
    source = textwrap.dedent(inspect.getsource(LoRATrainingOperator.__init__))
    func = ast.parse(source).body[0]
    assert isinstance(func, ast.FunctionDef)
    args = func.args.kwonlyargs
    out = {}
    for arg, default in zip(args, func.args.kw_defaults):
        if (isinstance(default, ast.Call) and isinstance(default.func, ast.Attribute)
                and isinstance(default.func.value, ast.Name) and default.func.value.id == "conf"):
            section, key = (ast.literal_eval(a) for a in default.args[:2])
            fallback = next((ast.literal_eval(k.value) for k in default.keywords if k.arg == "fallback"), None)
            out[arg.arg] = f"`[{section}] {key}` (unset: `{fallback!r}`)"
    return out


def arguments() -> list[Argument]:
    """Every keyword argument of the operator that is not a spec field, in signature order; a pod option is
    described where PodOptions defines it."""
    docs = {name: _markdown(PodOptions.model_fields[name].description or "") + "." for name in POD_FIELDS}
    docs.update(param_docs())
    from_config = _config_defaults()
    templated = set(LoRATrainingOperator.template_fields)
    out = []
    for name, param in inspect.signature(LoRATrainingOperator.__init__).parameters.items():
        if name in ("self", "kwargs") or name in SPEC_FIELDS:
            continue
        default = from_config.get(name) or f"`{param.default!r}`"
        annotation = param.annotation if isinstance(param.annotation, str) else inspect.formatannotation(
            param.annotation)
        out.append(Argument(name, annotation, default, docs.get(name) or _mentioned_in(name, docs),
                            name in templated))
    return out


def _mentioned_in(name: str, docs: dict[str, str]) -> str:
    """An argument the docstring documents inside another's entry (``trainer_runtime_kind`` in trainer_runtime's)."""
    owner = next((other for other, text in docs.items() if f"`{name}`" in text), None)
    return f"See `{owner}`." if owner else ""


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def argument_table() -> str:
    rows = ["| Argument | Type | Default | Templated | Description |",
            "|----------|------|---------|-----------|-------------|"]
    for arg in arguments():
        rows.append("| " + " | ".join([f"`{arg.name}`", f"`{_cell(arg.annotation)}`", _cell(arg.default),
                                       "yes" if arg.templated else "", _cell(arg.doc)]) + " |")
    return "\n".join(rows) + "\n"


def config_table() -> str:
    """The ``[lora]`` options the provider declares (get_provider_info's config section)."""
    section = get_provider_info()["config"]["lora"]
    rows = ["| Option | Environment variable | Default | Description |", "|---|---|---|---|"]
    for option, spec in section["options"].items():
        rows.append(f"| `[lora] {option}` | `AIRFLOW__LORA__{option.upper()}` | `{spec['default']!r}` | "
                    f"{_cell(spec['description'].strip())} |")
    return "\n".join(rows) + "\n"


def return_value_table() -> str:
    """The ``artifacts`` keys as the code computes them, for an example output location with merged weights."""
    root = "s3://bucket/runs/run-1"
    uris = artifact_uris(root, ["merged/model.safetensors"])
    rows = ["| `artifacts` key | Example value | |", "|---|---|---|"]
    for key, uri in uris.items():
        note = "only when `save_merged` published merged weights" if key == "merged" else ""
        rows.append(f"| `{key}` | `{uri}` | {note} |")
    return "\n".join(rows) + "\n"


def document() -> str:
    """The whole of docs/operator.md."""
    return (
        "# LoRATrainingOperator reference\n"
        "\n"
        f"<!-- Generated by `{COMMAND}` from the operator's signature and docstring; never edit by hand. -->\n"
        "\n"
        "`from airflow_provider_lora.operators.lora import LoRATrainingOperator`. The operator takes three kinds of "
        "keyword arguments:\n"
        "\n"
        "- every LoRA training parameter (the `LoRASpec` fields: `base_model`, `dataset`, `output_uri`, `lora_r`, "
        "...), listed with their defaults in [parameters.md](parameters.md); all of them are templated;\n"
        "- the arguments below, which say where and how the training runs (launcher, cluster, image, scheduling, "
        "volumes, secrets, timeouts, clean-up, S3 access);\n"
        "- Airflow's own `BaseOperator` arguments (`task_id`, `retries`, `execution_timeout`, `pool`, ...).\n"
        "\n"
        "Requirements (Python, Airflow, providers, Kubernetes, Kubeflow Trainer, the GPU driver) are in "
        "[requirements.md](requirements.md); how-to guides with an example DAG per launcher in "
        "[howto.md](howto.md).\n"
        "\n"
        f"This page is generated by `{COMMAND}` and is never hand-edited; a test fails when it drifts from the code.\n"
        "\n"
        "## Arguments\n"
        "\n"
        + argument_table()
        + "\n"
        "**Templated**: the argument is in `template_fields`, so Jinja (`{{ params.x }}`, `{{ var.value.x }}`, "
        "`{{ run_id }}`) is rendered before the task runs.\n"
        "\n"
        "## Airflow configuration\n"
        "\n"
        "Options of the `[lora]` section the provider declares:\n"
        "\n"
        + config_table()
        + "\n"
        "## What the task returns\n"
        "\n"
        "The return value (XCom `return_value`) is a dict with three keys: `summary` (the run's `summary.json`), "
        f"`history` (the loss history, at most {XCOM_HISTORY_POINTS} rows) and `artifacts` (the URIs of what the "
        "run published under `output_uri`):\n"
        "\n"
        + return_value_table()
        + "\n"
        "When neither the trigger's event, the pod's log nor the published run holds the result, it comes from the "
        f"pod's termination message (at most {TERMINATION_MESSAGE_BYTES} bytes): `history` is then empty, `summary` "
        "holds only the headline figures, and `artifacts` what fitted: every key, or only `root` when the URIs are "
        "too long; when none fitted, the keys are derived from `output_uri`, without `merged`.\n"
        "\n"
        f"Other XComs: `{XCOM_LAUNCHED}` (the launched object: `kind`, `name`, `namespace`; pod and trainjob "
        f"launchers) and `{CHART_XCOM_KEY}` (the loss chart page, for the Loss chart tab).\n"
    )


def main(argv: list[str] | None = None) -> int:
    return write_or_check(argv, command=COMMAND, what="the operator reference (docs/operator.md)", default=DOC_PATH,
                          document=document)


if __name__ == "__main__":
    sys.exit(main())
