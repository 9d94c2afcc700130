"""The environments: flake.nix parses (when nix is installed), pyproject's extras name what they should,
and every module of the project imports."""

import importlib
import os
import re
import shutil
import subprocess
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("fields", "hypernets", "scripts")


def read_pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def requirement_name(requirement: str) -> str:
    """``"jax[cuda12]>=0.10.2,<0.11"`` -> ``"jax"`` (lower case, ``_`` as ``-``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return match.group(1).lower().replace("_", "-")


def minor_series(requirements: list[str], name: str) -> str:
    """The ``>=X.Y`` lower bound's ``X.Y`` of ``name`` among ``requirements``."""
    for requirement in requirements:
        if requirement_name(requirement) == name:
            match = re.search(r">=\s*(\d+\.\d+)", requirement)
            assert match, f"{requirement!r} has no >= bound"
            return match.group(1)
    raise AssertionError(f"{name} not among {requirements}")


@pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="nix is not installed (no nix-instantiate)")
def test_flake_parses():
    result = subprocess.run(["nix-instantiate", "--parse", os.path.join(REPO, "flake.nix")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_flake_declares_the_dev_shell():
    with open(os.path.join(REPO, "flake.nix")) as handle:
        flake = handle.read()
    for needle in ("devShells", "python311", "allowUnfree = true", "cudaPackages", "make install", "[dev",
                   "LD_LIBRARY_PATH", "/run/opengl-driver/lib"):
        assert needle in flake, f"flake.nix lacks {needle!r}"


def test_pyproject_extras_name_the_expected_packages():
    project = read_pyproject()["project"]
    extras = project["optional-dependencies"]
    assert {"dev", "gpu", "text", "shapes"} <= set(extras)
    assert [requirement_name(r) for r in extras["shapes"]] == ["pybullet"]
    assert {"pytest", "ruff"} <= {requirement_name(r) for r in extras["dev"]}
    gpu = extras["gpu"]
    assert {requirement_name(r) for r in gpu} >= {"cupy-cuda12x"}
    cuda_jax = [r for r in gpu if requirement_name(r) in ("jax", "jax-cuda12-plugin")]
    assert cuda_jax, gpu
    assert any("cuda12" in r for r in cuda_jax), gpu
    # The CUDA plugin must come from the same jax series as the default dependencies.
    assert minor_series(cuda_jax, requirement_name(cuda_jax[0])) == minor_series(project["dependencies"], "jax")
    # [text] holds only packages the project imports.
    sources = []
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name)) as handle:
                        sources.append(handle.read())
    code = "\n".join(sources)
    for requirement in extras["text"]:
        module = requirement_name(requirement).replace("-", "_")
        assert re.search(rf"^\s*(import|from)\s+{module}\b", code, re.MULTILINE), f"[text] {module} is never imported"


def project_modules() -> list[str]:
    modules = []
    for package in PACKAGES:
        for root, directories, files in os.walk(os.path.join(REPO, package)):
            directories[:] = sorted(d for d in directories if not d.startswith((".", "__")))
            for name in sorted(files):
                if name.endswith(".py"):
                    relative = os.path.relpath(os.path.join(root, name), REPO)[: -len(".py")]
                    module = relative.replace(os.sep, ".")
                    modules.append(module[: -len(".__init__")] if module.endswith(".__init__") else module)
    return modules


def test_every_module_imports():
    modules = project_modules()
    assert {"fields.encode_dataset", "fields.distributed", "hypernets.loop", "scripts.make_scenes"} <= set(modules)
    failures = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 -- report every failing module at once
            failures[module] = f"{type(error).__name__}: {error}"
    assert not failures, failures
