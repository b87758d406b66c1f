"""Command line: every LoRASpec field is a ``--kebab-case`` flag; ``--spec FILE.json`` supplies a whole spec and
flags given alongside override its values."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from airflow_provider_lora.core.spec import LoRASpec, SpecError


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _is_bool(annotation: typing.Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) is typing.Union and bool in typing.get_args(annotation))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-train", description="Fine-tune a language model with LoRA (unsloth backend).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--spec", type=Path, help="JSON file with spec fields; flags override it")
    source.add_argument("--spec-json", help="the spec as a JSON string (how pods receive it); flags override it")
    parser.add_argument("--work-dir", help="local staging directory when output_uri is s3:// (default: a temp dir)")
    plan = parser.add_argument_group("preflight plan (nothing is trained or written)")
    plan.add_argument("--plan", action="store_true",
                      help="read the data and the model's config as the training would, and print the dataset, "
                           "model, memory and time estimates (and a LORA_PLAN JSON line) instead of training; exit "
                           "code 2 when the run would not fit in memory")
    plan.add_argument("--plan-memory-gib", type=float, metavar="GIB",
                      help="memory per process the plan compares its estimate with (default: this machine's GPU, "
                           "else resource_memory_per_worker when the spec sets it, else this machine's free memory)")
    plan.add_argument("--plan-device", choices=("cuda", "cpu"),
                      help="the device the training runs on (default: this machine's); a GPU training planned on a "
                           "CPU machine is estimated for the GPU and not timed")
    plan.add_argument("--plan-measure", action=argparse.BooleanOptionalAction, default=True,
                      help="measure throughput with a few forward/backward passes of the model (loads its weights) "
                           "to estimate the time per epoch")
    group = parser.add_argument_group("spec fields (see docs/parameters.md)")
    for name, field in LoRASpec.model_fields.items():
        help_text = (field.description or "").replace("%", "%%")
        # Values stay strings here: LoRASpec parses and validates them, with the same messages as everywhere else.
        if _is_bool(field.annotation):
            group.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} [spec default: {field.default}]")
        else:
            group.add_argument(flag_name(name), dest=name, default=None, metavar="VALUE",
                               help=f"{help_text} [spec default: {field.default!r}]")
    return parser


def spec_from_args(args: argparse.Namespace) -> LoRASpec:
    values: dict[str, typing.Any] = {}
    if args.spec is not None:
        try:
            values = json.loads(args.spec.read_text())
        except (OSError, ValueError) as exc:
            raise SpecError([f"--spec {str(args.spec)!r}: cannot read a JSON object from it ({exc})"]) from None
    elif args.spec_json is not None:
        try:
            values = json.loads(args.spec_json)
        except ValueError as exc:
            raise SpecError([f"--spec-json: not a JSON object ({exc})"]) from None
    if not isinstance(values, dict):
        raise SpecError([f"the spec must be a JSON object of field names to values, got {type(values).__name__}"])
    for name in LoRASpec.model_fields:
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    return LoRASpec.parse(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
    except SpecError as exc:
        print(f"lora-train: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        from lora_trainer.plan import main_entry as plan_entry  # torch, transformers; not unsloth

        return plan_entry(spec, args.plan_memory_gib, args.plan_measure, args.plan_device)
    from lora_trainer.train import main_entry  # heavy: torch, unsloth

    return main_entry(spec, args.work_dir)


if __name__ == "__main__":
    sys.exit(main())
