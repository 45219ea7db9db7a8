"""`dynlab recompute`: metrics that need only σ, from a store's stored spectra."""

from __future__ import annotations

from typing import Annotated

from dynlab_cli.options import Progress, Store, metrics_option


def recompute(
    store: Store,
    metrics: Annotated[str, metrics_option(
        help="Comma list of metrics computable from the singular values (e.g. alpha, "
        "alpha_ks, alpha_n_tail, per, cn), or 'all' for every such metric.")],
    progress: Progress = True,
) -> None:
    """Compute metrics from the singular values already in STORE, without the checkpoints,
    and write them into STORE (the output is the store itself: no -o). New metrics are
    added to the store, existing ones are overwritten."""
    from dynlab_cli.console import guarded

    with guarded("recompute"):
        from dynlab.analysis.recompute import recompute as run_recompute

        written = run_recompute(store, metrics, progress=progress)
    print(f"{store}: wrote {', '.join(written)}")
