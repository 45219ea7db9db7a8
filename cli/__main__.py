"""`python -m dynlab_cli ...`: the `dynlab` command line (as `python -m dynlab ...`)."""

from dynlab_cli.main import app

if __name__ == "__main__":
    app(prog_name="dynlab")
