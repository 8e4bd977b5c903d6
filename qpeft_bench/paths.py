"""Where the shipped configs and scripts are, for a checkout and for an installed wheel alike.

A checkout (and its editable install) keeps conf/ at the repository's top level; a wheel carries a copy inside the
package (setup.py puts it there), because site-packages has no repository around it.
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _shipped(rel: str) -> Path:
    inside = PACKAGE / rel  # an installed wheel
    return inside if inside.exists() else PACKAGE.parent / rel  # a checkout


CONF_DIR = str(_shipped("conf"))
SLURM_ARRAY = _shipped("scripts/slurm_array.sh")
