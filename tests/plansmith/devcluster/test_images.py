"""What goes into the plansmith images: every runtime extra, no test tools; a new key per change."""

from __future__ import annotations

from plansmith.devcluster import images


def test_image_requirements_are_the_package_with_operator_builder_and_runtime_extras(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("""
[project]
name = "plansmith"
dependencies = ["boto3>=1.34"]
[project.optional-dependencies]
operator = ["kopf>=1.37"]
builder = ["onnxruntime>=1.18"]
runtime = ["onnxruntime>=1.18", "aiohttp>=3.9"]
dev = ["plansmith[operator]", "pytest>=8"]
""")
    assert images.requirements(pyproject) == ["aiohttp>=3.9", "boto3>=1.34", "kopf>=1.37", "onnxruntime>=1.18"]


def test_source_digest_changes_with_the_code(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    for top in images.SOURCE_DIRS:
        (tmp_path / top / "pkg").mkdir(parents=True)
        (tmp_path / top / "pkg" / "__init__.py").write_text("")
    before = images.source_digest(tmp_path)
    (tmp_path / "operator" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "operator" / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    assert images.source_digest(tmp_path) == before  # bytecode is not source
    (tmp_path / "operator" / "pkg" / "__init__.py").write_text("VERSION = 2\n")
    assert images.source_digest(tmp_path) != before
