"""deploy/argocd: the InferenceModel health check, run by a real Lua 5.1 (lupa; Argo CD's gopher-lua
is Lua 5.1) against the sample objects of health_test.yaml, Argo CD's own test-case format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ARGOCD = Path(__file__).resolve().parents[2] / "deploy" / "argocd"
CHECK = ARGOCD / "plansmith.io" / "InferenceModel"
CASES = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
CM_KEY = "resource.customizations.health.plansmith.io_InferenceModel"


def lua_runtime():
    from lupa import lua51

    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    # Argo CD runs health scripts without io, os, file loading or modules; so do we.
    runtime.execute("io, os, require, package, dofile, loadfile, debug = nil, nil, nil, nil, nil, nil, nil")
    return runtime


def to_lua(runtime, value: Any):
    """A YAML/JSON value as Argo CD hands it to Lua: maps and lists become tables, null becomes nil."""
    if isinstance(value, dict):
        table = runtime.table()
        for key, item in value.items():
            if item is not None:
                table[key] = to_lua(runtime, item)
        return table
    if isinstance(value, list):
        table = runtime.table()
        for index, item in enumerate(value, start=1):
            table[index] = to_lua(runtime, item)
        return table
    return value


def health(obj: dict, script: str | None = None) -> dict[str, str]:
    runtime = lua_runtime()
    runtime.globals().obj = to_lua(runtime, obj)
    result = runtime.execute(script if script is not None else (CHECK / "health.lua").read_text())
    return {key: result[key] for key in ("status", "message") if result[key] is not None}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_of_sample_object(case):
    obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    assert health(obj) == case["healthStatus"]


def test_every_health_status_is_covered():
    assert {c["healthStatus"]["status"] for c in CASES} == {"Healthy", "Progressing", "Degraded"}


def test_sample_objects_are_valid_inferencemodels():
    """The samples carry a spec the API accepts and a status of the shape the operator writes."""
    from plansmith.spec import InferenceModelStatus
    from plansmith.validation import parse_object

    for case in CASES:
        obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
        status = obj.pop("status", None)
        obj["metadata"].pop("generation")
        parse_object(obj)
        if status is not None:
            InferenceModelStatus.model_validate(status)


def test_ready_condition_alone_is_not_enough_when_status_is_stale():
    obj = yaml.safe_load((CHECK / "testdata" / "healthy.yaml").read_text())
    assert health(obj)["status"] == "Healthy"
    obj["metadata"]["generation"] += 1  # the user changed the spec; the operator has not caught up
    assert health(obj)["status"] == "Progressing"


def test_a_failed_target_outweighs_a_ready_condition():
    obj = yaml.safe_load((CHECK / "testdata" / "healthy.yaml").read_text())
    obj["status"]["targets"][1].update(state="Failed", reason="BuildJobFailed", message="OOMKilled")
    assert health(obj) == {"status": "Degraded",
                           "message": "Build for NVIDIA-A100-SXM4-80GB failed: BuildJobFailed: OOMKilled"}


def test_argocd_cm_snippet_carries_the_same_script():
    snippet = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert snippet["metadata"]["name"] == "argocd-cm"
    assert snippet["data"][CM_KEY] == (CHECK / "health.lua").read_text(), (
        "deploy/argocd/argocd-cm.yaml must embed plansmith.io/InferenceModel/health.lua verbatim"
    )
