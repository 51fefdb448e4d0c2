"""deploy/examples: every example is a valid InferenceModel (`plansmith validate`), is commented,
and the real API server accepts it against the CRD (server-side dry-run)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.yaml"))
REQUIRED = {"minimal.yaml", "int8-calibration.yaml", "mig.yaml", "triton.yaml", "model.yaml"}


def test_the_promised_examples_exist():
    assert REQUIRED <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_plansmith_validate(example):
    result = subprocess.run([sys.executable, "-m", "plansmith.cli", "validate", str(example)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_explains_itself_in_comments(example):
    lines = example.read_text().splitlines()
    assert lines[0].startswith("#"), "an example starts with a comment saying what it shows"
    assert sum("#" in line for line in lines) >= 5


def test_examples_show_what_their_names_promise():
    spec = {p.name: yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES}
    assert set(spec["minimal.yaml"]) == {"model"}
    assert spec["int8-calibration.yaml"]["build"]["precision"] == "int8"
    assert spec["int8-calibration.yaml"]["build"]["calibration"]["uri"].startswith("s3://")
    assert spec["mig.yaml"]["serving"]["mig"]["profile"]
    assert spec["triton.yaml"]["serving"]["runtime"] == "triton"


@pytest.fixture(scope="module")
def inferencemodel_crd(control_plane, repo_root):
    """The InferenceModel CRD on the API server for this module; removed again (and waited for) if we
    installed it, so tests that create it themselves later in the session still can."""
    kubectl = [str(control_plane.kubectl), f"--kubeconfig={control_plane.kubeconfig}"]
    name = "crd/inferencemodels.plansmith.io"
    present = subprocess.run(kubectl + ["get", name], capture_output=True).returncode == 0
    if not present:
        subprocess.run(kubectl + ["create", "-f", str(repo_root / "crds/inferencemodel.yaml")], check=True,
                       capture_output=True)
    subprocess.run(kubectl + ["wait", "--for=condition=established", "--timeout=60s", name], check=True,
                   capture_output=True)
    subprocess.run(kubectl + ["create", "namespace", "nlp"], capture_output=True)  # int8-calibration.yaml's
    deadline = time.monotonic() + 30
    while subprocess.run(kubectl + ["get", "inferencemodels", "-A"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "inferencemodels never appeared in discovery"
        time.sleep(0.5)
    yield kubectl
    if not present:
        subprocess.run(kubectl + ["delete", name, "--wait=true", "--timeout=60s"], capture_output=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_api_server_accepts_example(inferencemodel_crd, example):
    result = subprocess.run(inferencemodel_crd + ["apply", "--dry-run=server", "-f", str(example)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout
