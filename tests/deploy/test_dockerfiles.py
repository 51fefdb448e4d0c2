"""Every Dockerfile in the repository (none can build here: no container engine): pinned base images,
a numeric non-root USER, OCI labels, and an exec-form ENTRYPOINT naming a real `plansmith` subcommand."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

REPO_ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {".git", ".venv", "node_modules", "build", "dist"}
DOCKERFILES = sorted(
    p for p in REPO_ROOT.rglob("Dockerfile*")
    if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(REPO_ROOT).parts)
)
REQUIRED_LABELS = ("org.opencontainers.image.title", "org.opencontainers.image.source", "org.opencontainers.image.version")
ids = [str(p.relative_to(REPO_ROOT)) for p in DOCKERFILES]


def instructions(path: Path, name: str) -> list[str]:
    return [item["value"] for item in DockerfileParser(str(path)).structure if item["instruction"] == name]


def final_stage(path: Path) -> list[dict]:
    structure = DockerfileParser(str(path)).structure
    starts = [i for i, item in enumerate(structure) if item["instruction"] == "FROM"]
    return structure[starts[-1]:]


def registered_subcommands() -> set[str]:
    from plansmith.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_the_operator_image_has_a_dockerfile():
    assert REPO_ROOT / "operator" / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_base_images_are_pinned(dockerfile):
    """Every FROM (with ARG defaults substituted) names a versioned tag or a digest, never :latest."""
    stages: set[str] = set()
    resolved = DockerfileParser(str(dockerfile)).parent_images
    for value, image in zip(instructions(dockerfile, "FROM"), resolved, strict=True):
        words = value.split()
        if len(words) >= 3 and words[-2].lower() == "as":
            stages.add(words[-1].lower())
        if image.lower() in stages or image == "scratch":
            continue
        if "@sha256:" in image:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag, f"FROM {image}: no tag (means :latest); pin a version or digest"
        assert tag != "latest" and "$" not in tag, f"FROM {image}: not pinned"
        assert re.search(r"\d", tag), f"FROM {image}: the tag names no version"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_runs_as_a_numeric_non_root_user(dockerfile):
    """Kubernetes can only enforce runAsNonRoot for an image whose USER is numeric."""
    users = [item["value"] for item in final_stage(dockerfile) if item["instruction"] == "USER"]
    assert users, "the final stage sets no USER (runs as root)"
    uid = users[-1].split(":")[0].strip()
    assert uid.isdigit(), f"USER {users[-1]}: use a numeric UID so runAsNonRoot can be verified"
    assert int(uid) != 0, "USER 0 is root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_has_oci_labels(dockerfile):
    labels = DockerfileParser(str(dockerfile)).labels
    missing = [label for label in REQUIRED_LABELS if not labels.get(label)]
    assert not missing, f"missing OCI labels: {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_entrypoint_is_a_registered_plansmith_subcommand(dockerfile):
    entrypoints = [item["value"] for item in final_stage(dockerfile) if item["instruction"] == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    try:
        argv = json.loads(entrypoints[-1])
    except json.JSONDecodeError:
        pytest.fail(f"ENTRYPOINT {entrypoints[-1]} is not in exec (JSON) form; signals would not reach the program")
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script of pyproject.toml ({sorted(scripts)})"
    assert len(argv) >= 2, "the ENTRYPOINT names no subcommand"
    assert argv[1] in registered_subcommands(), f"`{argv[0]} {argv[1]}` is not a registered subcommand"


def test_operator_image_installs_the_operator_extra_from_sources_that_exist():
    dockerfile = REPO_ROOT / "operator" / "Dockerfile"
    assert any('.[operator]' in run for run in instructions(dockerfile, "RUN"))
    for copy in instructions(dockerfile, "COPY"):
        *sources, _destination = copy.split()
        for source in sources:
            if not source.startswith("--"):
                assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the build context (repository root)"


def test_chart_runs_the_operator_as_the_images_user():
    uid = int([item["value"] for item in final_stage(REPO_ROOT / "operator" / "Dockerfile")
               if item["instruction"] == "USER"][-1].split(":")[0])
    values = yaml.safe_load((REPO_ROOT / "charts" / "plansmith" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == uid


BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in this image)", name=name)
        return None
sys.meta_path.insert(0, Block())
from plansmith.cli import main
sys.exit(main(sys.argv[2:]))
"""


def installed_extras(dockerfile: Path) -> set[str] | None:
    """The extras a Dockerfile installs with `pip install .[a,b]`, or None if it installs none that way."""
    for run in instructions(dockerfile, "RUN"):
        match = re.search(r"pip install [^&]*\.\[([a-z,\- ]+)\]", run)
        if match:
            return {extra.strip() for extra in match.group(1).split(",")}
    return None


def import_names_of(requirements: list[str]) -> set[str]:
    """Top-level import names of the installed distributions these requirement strings name."""
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    wanted = {Requirement(r).name.lower().replace("_", "-") for r in requirements}
    return {
        module for module, dists in packages_distributions().items()
        if any(d.lower().replace("_", "-") in wanted for d in dists)
    }


@pytest.mark.parametrize("dockerfile", [d for d in DOCKERFILES if installed_extras(d)], ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_entrypoint_starts_with_only_the_installed_extras(dockerfile):
    """`<entrypoint> --help` works when the packages of the extras the image does not install are
    missing, as they are in the image (the CLI must import heavy dependencies lazily)."""
    import subprocess
    import sys

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = installed_extras(dockerfile) or set()
    present = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    absent = [r for e, reqs in project["optional-dependencies"].items() if e not in extras for r in reqs
              if not r.startswith("plansmith")]
    blocked = import_names_of(absent) - import_names_of(present) - {"plansmith", "plansmith_builder", "plansmith_runtime"}
    assert blocked, "expected some packages outside the image's extras"
    argv = json.loads([i["value"] for i in final_stage(dockerfile) if i["instruction"] == "ENTRYPOINT"][-1])
    result = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(sorted(blocked)), *argv[1:], "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"`{' '.join(argv)} --help` fails without {sorted(blocked)}:\n{result.stderr[-3000:]}"


ON_NVIDIAS_BASE = [REPO_ROOT / "builder-image" / "Dockerfile", REPO_ROOT / "runtime-image" / "tensorrt-image" / "Dockerfile"]


@pytest.mark.parametrize("dockerfile", ON_NVIDIAS_BASE, ids=[str(p.relative_to(REPO_ROOT)) for p in ON_NVIDIAS_BASE])
def test_images_on_nvidias_base_install_onnxruntimes_gpu_build_and_check_it(dockerfile, tmp_path):
    """The builder and the GPU runtime install onnxruntime-gpu at the labelled version over the CPU
    build the extras bring (both install the `onnxruntime` module), and their build-time check refuses
    another version or a build without the CUDA execution provider. The images cannot be built on
    these machines, so the check runs here against stand-in tensorrt and onnxruntime modules."""
    parser = DockerfileParser(str(dockerfile))
    [run] = [run for run in instructions(dockerfile, "RUN") if "onnxruntime-gpu" in run]
    steps = [step.strip() for step in run.split("&&")]
    removed = steps.index("pip uninstall -y onnxruntime")
    [installed] = [i for i, step in enumerate(steps) if '"onnxruntime-gpu==${ONNXRUNTIME_VERSION}"' in step]
    assert removed < installed and "--no-deps" in steps[installed]
    assert not any(re.search(r'"onnxruntime==', step) for step in steps), "the CPU build is installed too"
    assert parser.labels["io.plansmith.onnxruntime-version"] == parser.args["ONNXRUNTIME_VERSION"]
    [checked] = [step for step in steps if step.startswith("python -c")]
    script = checked.removeprefix("python -c").strip().strip('"')
    for name, value in parser.args.items():
        script = script.replace("${%s}" % name, value)

    def check(tensorrt_version: str, onnxruntime_version: str, providers: list[str]) -> subprocess.CompletedProcess:
        modules = tmp_path / f"{tensorrt_version}-{onnxruntime_version}-{len(providers)}"
        modules.mkdir()
        (modules / "tensorrt.py").write_text(f"__version__ = {tensorrt_version!r}\n")
        (modules / "onnxruntime.py").write_text(f"__version__ = {onnxruntime_version!r}\n"
                                                f"def get_available_providers():\n    return {providers!r}\n")
        return subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(modules)},
                              capture_output=True, text=True)

    trt, ort = parser.args["TENSORRT_VERSION"], parser.args["ONNXRUNTIME_VERSION"]
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert check(trt, ort, gpu_build).returncode == 0
    cpu_build = check(trt, ort, ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert cpu_build.returncode == 1 and "onnxruntime has no CUDA execution provider" in cpu_build.stderr
    other_version = check(trt, "1.21.1", gpu_build)
    assert other_version.returncode == 1 and "differ from the installed" in other_version.stderr
