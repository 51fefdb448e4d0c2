"""The README's main job (`make quickstart` runs `python -m plansmith.devcluster.quickstart` after set-up):
on the local cluster it installs plansmith with the Helm chart, applies deploy/examples/model.yaml,
waits for Ready and asks the model a question through its Service. Its printed answer is checked,
and running it a second time is safe."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(1500)


def run_quickstart(repo_root) -> str:
    result = subprocess.run([sys.executable, "-m", "plansmith.devcluster.quickstart"], cwd=repo_root,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_main_job_serves_the_example_and_its_answer_is_right(dev_cluster, repo_root):
    output = run_quickstart(repo_root)
    assert re.search(r"model tiny-cnn on the Service [\d.]+:8000 answered \(4, 10\) logits", output), output[-2000:]
    assert "answer matches the reference: OK" in output
    assert len(re.findall(r"^  image \d: class \d+ \(logit ", output, flags=re.M)) == 4
    records = re.findall(r"engine ([0-9a-f]{32})\n  sha256 ([0-9a-f]{64})", output)
    assert len(records) == 2, output[-2000:]  # one engine per simulated GPU type
    assert "accuracy cosine" in output and "latency p50" in output

    again = run_quickstart(repo_root)  # re-running is safe: same engines, nothing rebuilt
    assert re.findall(r"engine ([0-9a-f]{32})\n  sha256 ([0-9a-f]{64})", again) == records
    assert "answer matches the reference: OK" in again
    kubectl = [str(dev_cluster.kubectl), "--kubeconfig", str(dev_cluster.kubeconfig)]
    jobs = subprocess.run([*kubectl, "get", "jobs", "-n", "default", "-l", "app.kubernetes.io/component=build",
                           "-o", "name"], capture_output=True, text=True, check=True).stdout.split()
    assert len(jobs) == 2
