"""Fixtures for the Helm chart tests: the real helm v4 binary and a renderer for the chart."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

RELEASE = "plansmith"
NAMESPACE = "plansmith-system"


@pytest.fixture(scope="session")
def helm() -> Path:
    from plansmith.devcluster.helm import helm_binary

    return helm_binary()


@pytest.fixture(scope="session")
def chart_dir(repo_root: Path) -> Path:
    return repo_root / "charts" / "plansmith"


@pytest.fixture(scope="session")
def run_helm(helm: Path, chart_dir: Path) -> Callable[..., subprocess.CompletedProcess]:
    """run_helm("template"|"lint", values=None, *args): helm on the chart, values (a dict) given on stdin."""

    def run(command: str, values: dict[str, Any] | None = None, *args: str) -> subprocess.CompletedProcess:
        argv = [str(helm), command]
        if command == "template":
            argv.append(RELEASE)
        argv += [str(chart_dir), *args]
        if values is not None:
            argv += ["--values", "-"]
        return subprocess.run(argv, input=json.dumps(values) if values is not None else None,
                              capture_output=True, text=True)

    return run


@pytest.fixture(scope="session")
def render_chart(run_helm) -> Callable[..., list[dict[str, Any]]]:
    """render_chart(values=None, *args, namespace=NAMESPACE) -> the rendered objects. A render
    helm refuses fails the test with helm's message."""

    def render(values: dict[str, Any] | None = None, *args: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        result = run_helm("template", values, "--namespace", namespace, *args)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return render
