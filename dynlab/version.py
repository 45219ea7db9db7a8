"""The version of dynlab: the one place it is written.

`pyproject.toml` reads it for the wheel (`[tool.setuptools.dynamic]`), `dynlab --version`
prints it, and every run (`run.json["dynlab_version"]`) and store (attribute
`dynlab_version`) records it.
"""

__version__ = "0.2.0"
