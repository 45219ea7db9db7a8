"""`python -m dynlab.train decoder|relora [OPTIONS]` (same as `dynlab train`)."""

from dynlab_cli.train import app

if __name__ == "__main__":
    app(prog_name="python -m dynlab.train")
