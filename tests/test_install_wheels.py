"""scripts/install_wheels.py: a wheel is installed on the GPU machine only when its package is missing or older."""

import importlib.metadata
from pathlib import Path

import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def install_wheels():
    return load_script("scripts/install_wheels.py")


def test_needed_only_when_missing_or_older(install_wheels):
    have = importlib.metadata.version("pytest")
    assert not install_wheels.needed(Path(f"pytest-{have}-py3-none-any.whl"))
    assert not install_wheels.needed(Path("pytest-1.0-py3-none-any.whl"))
    assert install_wheels.needed(Path("pytest-9999.0-py3-none-any.whl"))
    assert install_wheels.needed(Path("surely_not_installed_pkg-1.0-py3-none-any.whl"))


def test_nothing_to_install_and_bad_usage(install_wheels, tmp_path, capsys):
    have = importlib.metadata.version("pytest")
    (tmp_path / f"pytest-{have}-py3-none-any.whl").write_bytes(b"")
    assert install_wheels.main([str(tmp_path), str(tmp_path / "site")]) == 0
    assert "installing 0 of 1" in capsys.readouterr().out and not (tmp_path / "site").exists()
    assert install_wheels.main([str(tmp_path)]) == 2
