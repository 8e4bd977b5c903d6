"""Ships conf/ and the SLURM array submitter inside the wheel.

conf/ stays at the repository's top level, where Hydra users expect it; a wheel installed anywhere carries a copy
at qpeft_bench/conf (and scripts/slurm_array.sh at qpeft_bench/scripts/), which qpeft_bench.paths finds. An
editable install (make setup) reads the checkout's own conf/ and copies nothing.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"conf": ROOT / "conf", "scripts/slurm_array.sh": ROOT / "scripts" / "slurm_array.sh"}


def _site_settings(folder: str, names: list[str]) -> list[str]:
    """conf/local/*.yaml are one site's settings (git-ignored): never ship them to others."""
    return [n for n in names if Path(folder).name == "local" and n != "README.md"]


class BuildWithConf(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        package = Path(self.build_lib) / "qpeft_bench"
        for rel, src in SHIPPED.items():
            dst = package / rel
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True, ignore=_site_settings)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildWithConf})
