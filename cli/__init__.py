"""The `dynlab` command line (installed as `dynlab_cli`).

Importing it sets GOMP_SPINCOUNT=1000 before torch loads, unless the user chose a policy
(OMP_WAIT_POLICY or GOMP_SPINCOUNT set): torch's OpenMP threads (GNU libgomp in the Linux
wheels) then spin briefly while they wait and sleep after that, instead of spinning for
300 000 iterations. Measured on 2 cores, BLiMP scoring with 2 threads (bench/RESULTS.md):
quiet, 3.11 s against 2.97 s with the default (PASSIVE waiting: 5.40 s); with six busy
processes on the cores, 4.0 s against 17.8 s (PASSIVE 5.5 s).
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
