"""`python -m dynlab ...` (and `torchrun -m dynlab train ...`): the `dynlab` command line.

An entry point only: nothing in the library imports it.
"""

from dynlab_cli.main import run

if __name__ == "__main__":
    run()
