"""The analysis pipeline, one module per stage:

    plan -> components -> spectra -> metrics -> task -> serial | dask -> store

`dynlab.analysis.analyze(runs, out=...)` runs it. Foreign checkpoints reach it through
`dynlab.sources`; figures read the store through `dynlab.viz`.
"""

from dynlab.analysis.run import Options, analyze

__all__ = ["Options", "analyze"]
