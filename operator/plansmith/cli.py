"""The `plansmith` command.

`validate` is defined here; every other subcommand lives in its own module, listed in
SUBCOMMAND_MODULES, which exposes `register(subparsers)` and imports its heavy dependencies
(onnxruntime, kopf, ...) only inside its handler, so `plansmith validate` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml

from plansmith.validation import InvalidSpec, load_models


SUBCOMMAND_MODULES: list[str] = ["plansmith.controller.cli", "plansmith_builder.cli", "plansmith_runtime.cli",
                                   "plansmith_runtime.trace_summary", "plansmith.devcluster.cli", "plansmith.up"]


def cmd_validate(args: argparse.Namespace) -> int:
    """Check InferenceModel files; print each defaulted object, or each problem with its field path."""
    status = 0
    for name in args.files:
        path = Path(name)
        try:
            text = sys.stdin.read() if name == "-" else path.read_text(encoding="utf-8")
            models = load_models(text, source=name)
        except OSError as error:
            print(f"{name}: cannot read: {error.strerror or error}", file=sys.stderr)
            status = 1
            continue
        except UnicodeDecodeError:
            print(f"{name}: not a UTF-8 text file", file=sys.stderr)
            status = 1
            continue
        except InvalidSpec as error:
            print(f"{name}: invalid InferenceModel ({len(error.problems)} problem(s)):", file=sys.stderr)
            for problem in error.problems:
                print(f"  {problem}", file=sys.stderr)
            status = 1
            continue
        for model in models:
            if not args.quiet:
                sys.stdout.write("---\n" + yaml.safe_dump(model.to_api(), sort_keys=False))
            print(f"{name}: InferenceModel {model.metadata.name!r} is valid", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plansmith",
        description="Compile ONNX models into per-GPU-type engines, store them content-addressed, serve them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check InferenceModel YAML files and print them with defaults filled in",
        description="Exit 0 when every file is valid, 1 otherwise (each problem is printed with its field path).",
    )
    validate.add_argument("files", nargs="+", metavar="FILE.yaml", help="InferenceModel manifest(s); - for stdin")
    validate.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")
    validate.set_defaults(handler=cmd_validate)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
