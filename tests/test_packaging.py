"""The distribution: everything under one package, ``p2pchat``, and nothing else in site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(out), str(ROOT)], check=True, timeout=120)
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_one_top_level_package(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"p2pchat"}


def test_every_package_of_the_repository_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    packages = [p.parent.relative_to(ROOT) for top in ("broker", "client", "common")
                for p in (ROOT / top).rglob("__init__.py")]
    missing = [str(p) for p in packages if f"p2pchat/{p.as_posix()}/__init__.py" not in names]
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_the_command_is_p2pchat(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "p2pchat = p2pchat.client.cli:main" in wheel.read(entry).decode()
