"""`qpeft-bench-array SWEEP [overrides]`: scripts/slurm_array.sh, reachable from an installed wheel.

The script submits a sweep as one `sbatch --array`; its environment knobs (PARALLEL, PARTITION, GPUS, ...) are
documented at its top. This entry point only runs the copy that ships with the package.
"""

import os
import sys

from qpeft_bench.paths import SLURM_ARRAY


def main() -> None:
    os.execvp("bash", ["bash", str(SLURM_ARRAY), *sys.argv[1:]])
