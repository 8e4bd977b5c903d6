"""The wheel carries conf/ and the SLURM array submitter, so an installed qpeft-bench runs from any directory
(issue 19). Installing it into a fresh venv and running every entry point is `make check-wheel` (in .ci/run);
these check, in seconds, what that depends on."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qpeft_bench import paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("dist")
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' scratch copy: a stale one leaks deleted files
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(out)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    (path,) = out.glob("qpeft_bench-*.whl")
    return zipfile.ZipFile(path)


def _tracked(folder: str) -> set[str]:
    listed = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(listed.stdout.split())


def test_the_wheel_carries_every_tracked_config_and_the_array_script(wheel):
    names = set(wheel.namelist())
    missing = {f for f in _tracked("conf") if f"qpeft_bench/{f}" not in names}
    assert not missing, f"conf files not in the wheel: {sorted(missing)}"
    assert "qpeft_bench/scripts/slurm_array.sh" in names
    assert "qpeft_bench/assets/tiny_llama/config.json" in names


def test_the_wheel_carries_no_site_settings(wheel):
    shipped = [n for n in wheel.namelist() if n.startswith("qpeft_bench/conf/local/")]
    assert shipped == ["qpeft_bench/conf/local/README.md"]


def test_the_wheel_declares_every_entry_point(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    text = wheel.read(entry).decode()
    for script in ("qpeft-bench =", "qpeft-bench-report =", "qpeft-bench-array =", "qpeft-bench-data ="):
        assert script in text


def test_an_installed_package_reads_its_own_conf_and_a_checkout_its_top_level_one(tmp_path, monkeypatch):
    assert Path(paths.CONF_DIR) == ROOT / "conf"  # this checkout: no conf/ inside the package
    installed = tmp_path / "site-packages" / "qpeft_bench"
    (installed / "conf").mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE", installed)
    assert paths._shipped("conf") == installed / "conf"
