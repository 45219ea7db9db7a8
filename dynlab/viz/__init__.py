"""Figures, the HTML report and screenshots of analysis stores (the schema of
`dynlab.analysis.store`)."""

from dynlab.viz.figures import (
    LOG_METRICS,
    heatmap,
    layer_mean_ci,
    relora_comparison,
    reset_steps,
    spectrum,
    summary_table,
    training_curves,
    trajectory,
    trajectory_grid,
)
from dynlab.viz.report import (
    build_report,
    load_stores,
    save_figure,
    screenshot,
    write_report,
)

__all__ = [
    "LOG_METRICS", "build_report", "heatmap", "layer_mean_ci", "load_stores", "relora_comparison",
    "reset_steps", "save_figure", "screenshot", "spectrum", "summary_table", "training_curves",
    "trajectory", "trajectory_grid", "write_report",
]
