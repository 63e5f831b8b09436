"""The package as shipped: the sdist's contents and metadata, and how setup.py finds the CUDA library headers."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
import tarfile

import pytest
import setuptools

from helpers import REPO


def _source_files() -> list[str]:
    """The files of the working tree that a clean clone would have (tracked, or new and not ignored)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """An sdist built (by setuptools' PEP 517 hook, as pip and `python -m build` call it) from a copy of the tree."""
    tree = tmp_path_factory.mktemp("tree")
    for name in _source_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    dist = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "FASTSFT_NO_EXTENSION": "1"}  # the file list does not depend on the extension
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
                   cwd=tree, env=env, check=True, capture_output=True, timeout=300)
    (path,) = dist.glob("fastsft-*.tar.gz")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        pkg_info = tar.extractfile(f"{root}/PKG-INFO").read().decode()
    return {"files": {n.split("/", 1)[1] for n in names if "/" in n}, "pkg_info": pkg_info}


def test_sdist_has_every_source_and_header(sdist):
    sources = [f for f in _source_files() if f.startswith("csrc/") and f.endswith((".h", ".cuh", ".cpp", ".cu"))]
    assert any(f.endswith(".h") for f in sources)
    missing = sorted(set(sources) - sdist["files"])
    assert not missing, f"left out of the sdist: {missing}"
    assert {"setup.py", "pyproject.toml", "CMakeLists.txt", "LICENSE", "fastsft/data/demo_chat.jsonl",
            "fastsft/data/demo_model/config.json", "fastsft/card_table.json"} <= sdist["files"]


def test_license_file_and_metadata(sdist):
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "The fastsft authors" in text
    metadata = sdist["pkg_info"]
    assert "Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    version = metadata.split("\nVersion: ", 1)[1].split("\n", 1)[0]
    import fastsft

    assert version == fastsft.__version__  # one place holds the version


def test_requirements_are_ranges_and_declared_where_imported(sdist):
    requires = [line.split(": ", 1)[1] for line in sdist["pkg_info"].splitlines() if line.startswith("Requires-Dist")]
    pinned = [r for r in requires if "==" in r.split(";")[0]]
    assert not pinned, f"exact pins in the package's requirements: {pinned}"
    trl = [r.split(";")[0] for r in requires if r.startswith("trl")]
    assert len(trl) == 1 and ">=1.16" in trl[0] and "<2" in trl[0], trl
    core = {r.split(";")[0].split("<")[0].split(">")[0].strip() for r in requires if "extra ==" not in r}
    code = "\n".join(p.read_text() for folder in ("fastsft", "triton_kernels") for p in (REPO / folder).rglob("*.py"))
    for dist, module in {"tqdm": "tqdm", "pyyaml": "yaml", "triton": "triton"}.items():
        imported = re.search(rf"^\s*(import|from) {module}\b", code, re.M) is not None
        assert (dist in core) == imported, f"{dist}: {'not ' if not imported else ''}imported by the package, " \
                                           f"{'' if dist in core else 'not '}declared in install_requires"


# setup.py's CUDA header search, run without building: setuptools.setup is replaced by a recorder


def _run_setup(monkeypatch, *, cuda_home, hide_nvidia=False, require=False):
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        pytest.skip("torch here is not a CUDA build")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))
    for var in ("FASTSFT_NO_EXTENSION", "FASTSFT_CPU_ONLY", "CPATH", "CPLUS_INCLUDE_PATH", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FASTSFT_REQUIRE_EXTENSION", "1" if require else "0")
    if hide_nvidia:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: None if name == "nvidia" else find_spec(name, *args))
    recorded = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
    namespace = runpy.run_path(str(REPO / "setup.py"), run_name="fastsft_setup")
    return recorded["ext_modules"][0], namespace


def _bare_toolkit(tmp_path):
    """A CUDA toolkit with the runtime's headers but not cuBLAS/cuSPARSE/cuSOLVER's (as on the CPU machines)."""
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    return tmp_path


def test_build_finds_the_library_headers_of_the_nvidia_packages(monkeypatch, tmp_path):
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec is not None else []
    if not any(glob.glob(os.path.join(root, "*", "include", "cusparse.h")) for root in roots):
        pytest.skip("no nvidia pip package here has the CUDA library headers")
    ext, _ = _run_setup(monkeypatch, cuda_home=_bare_toolkit(tmp_path))
    assert any(s.endswith(".cu") for s in ext.sources), "the CUDA build was given up although the headers exist"
    toolkit = ext.include_dirs.index(str(tmp_path / "include"))
    nvidia = [i for i, d in enumerate(ext.include_dirs) if os.path.isfile(os.path.join(d, "cusparse.h"))]
    assert nvidia and min(nvidia) > toolkit  # searched after the toolkit's own headers, as CPATH would be


def test_build_without_the_headers_falls_back_to_cpp_or_fails_when_required(monkeypatch, tmp_path, capfd):
    ext, _ = _run_setup(monkeypatch, cuda_home=_bare_toolkit(tmp_path), hide_nvidia=True)
    assert not any(s.endswith(".cu") for s in ext.sources) and ext.sources
    lines = [line for line in capfd.readouterr().err.splitlines() if "cusparse.h" in line]
    assert len(lines) == 1 and "C++-only" in lines[0]  # one line that says why
    with pytest.raises(SystemExit, match="cusparse.h.*FASTSFT_REQUIRE_EXTENSION"):
        _run_setup(monkeypatch, cuda_home=tmp_path, hide_nvidia=True, require=True)


def test_setup_env_builds_only_when_an_input_changed(tmp_path):
    """scripts/setup_env.sh (sourced by test.sh and demo.sh) in a stand-in venv whose python runs this one, except
    that `python -m pip` only records its call: the second run must not build, FASTSFT_REBUILD=1 must."""
    venv, calls = tmp_path / "venv", tmp_path / "pip-calls"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> "{calls}"; exit 0; fi\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "FASTSFT_VENV": str(venv)}
    env.pop("FASTSFT_REBUILD", None)

    def pip_calls(**extra):
        subprocess.run(["bash", "-c", f'source "{REPO}/scripts/setup_env.sh"'], env={**env, **extra}, check=True,
                       capture_output=True, timeout=300)
        return calls.read_text().count("install") if calls.exists() else 0

    assert pip_calls() == 1  # no stamp yet: build
    assert pip_calls() == 1  # nothing changed: no build
    assert pip_calls(FASTSFT_REBUILD="1") == 2
