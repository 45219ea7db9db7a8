"""dynlab.train: the bundled pico-decoder / pico-relora trainer.

    import dynlab
    run_dir = dynlab.train("relora", steps=600, out="runs/relora")

`dynlab.train` is both this package and a function: importing a submodule
(`dynlab.train.data`) binds the package to `dynlab.train`, so the package itself is
callable and forwards to `dynlab.train.trainer.train`. Submodules load lazily.
"""

from __future__ import annotations

import sys
import types


def train(kind: str = "decoder", **options):
    """Train a model; see `dynlab.train.trainer.train` (returns the run directory)."""
    from dynlab.train.trainer import train as _train

    return _train(kind, **options)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["train"]
