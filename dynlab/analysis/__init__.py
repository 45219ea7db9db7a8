"""The analysis pipeline, one module per stage:

    plan -> task (components -> spectra -> metrics) -> serial | dask -> store

`dynlab.analysis.analyze(runs, out=...)` runs it (`analysis.run`); `Options` says what to
compute. Foreign checkpoints reach it through `dynlab.sources`; figures read the store
through `dynlab.viz`.
"""

from dynlab.analysis.plan import Options
from dynlab.analysis.run import analyze

__all__ = ["Options", "analyze"]
