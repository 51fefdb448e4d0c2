"""Reading the one InferenceModel a command takes (plansmith up, serve and build)."""

import pytest

from plansmith.validation import InvalidSpec, SpecFileError, read_single_model, single_model

MODEL = """apiVersion: plansmith.io/v1alpha1
kind: InferenceModel
metadata: {name: NAME}
spec:
  model: {uri: "file:///models/m.onnx"}
  storage: {uri: "file:///engines"}
"""


def test_a_file_with_one_model_gives_that_model(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(MODEL.replace("NAME", "resnet"))
    assert read_single_model(str(path)).metadata.name == "resnet"


def test_two_models_are_refused_by_count(tmp_path):
    text = MODEL.replace("NAME", "a") + "---\n" + MODEL.replace("NAME", "b")
    with pytest.raises(InvalidSpec, match="expected one InferenceModel, found 2"):
        single_model(text, "two.yaml")
    path = tmp_path / "two.yaml"
    path.write_text(text)
    with pytest.raises(SpecFileError) as raised:
        read_single_model(str(path))
    assert str(raised.value) == f"{path}: invalid InferenceModel:\n  expected one InferenceModel, found 2"


def test_an_invalid_or_unreadable_file_says_why(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MODEL.replace("NAME", "bad").replace("file:///models/m.onnx", "http://x/m.onnx"))
    with pytest.raises(SpecFileError) as raised:
        read_single_model(str(path))
    lines = str(raised.value).splitlines()
    assert lines[0] == f"{path}: invalid InferenceModel:" and "spec.model.uri" in lines[1]
    with pytest.raises(SpecFileError, match="cannot read"):
        read_single_model(str(tmp_path / "missing.yaml"))
