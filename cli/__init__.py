"""The `dynlab` command line (installed as `dynlab_cli`).

Importing it sets OMP_WAIT_POLICY=PASSIVE unless the user set a policy, before torch loads:
torch's OpenMP threads then sleep while they wait instead of spinning. On a 2-core machine
shared with other processes (load average ~12), BLiMP scoring with 2 threads took 233 s with
the default policy and 7.1 s with PASSIVE (1 thread: 12.7 s); see bench/RESULTS.md.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
