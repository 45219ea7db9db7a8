"""Make docs/guide/per_against_loss.png: PER of the OV circuit against the held-out mean
token loss for three tiny Hugging Face runs written by transformers (Llama, GPT-NeoX, GPT-2;
tests/hf_fixtures.py), evaluated with `dynlab eval --store` and analysed with `dynlab analyze`
into one store.

    PYTHONPATH=.:tests python docs/guide/per_against_loss.py [WORKDIR]

The PNG is drawn with matplotlib from the store's values (the report draws the same figure,
`dynlab.viz.figures.metric_against_loss`, with plotly)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

STEPS = (0, 4, 8, 16, 32, 64)


def main(work: Path) -> Path:
    import hf_fixtures as fx
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import dynlab
    from dynlab.eval import load_eval_data
    from dynlab.eval.sources import EvalOptions, evaluate_sources

    runs = []
    for arch in ("llama", "gpt_neox", "gpt2"):
        fx.train_and_save(arch, work / arch, STEPS)
        fx.save_tokenizer(work / arch)
        runs.append(work / arch)
    text = fx.write_text(work / "heldout.txt", n_docs=40)
    store = work / "fixtures.zarr"
    evaluate_sources(runs, load_eval_data(text, "none"), EvalOptions(), store=store,
                     metrics="per")
    dynlab.analyze(runs, store, metrics="per", progress=False)
    ds = dynlab.open_store(store).load()
    per = ds.per.sel(kind="weights", matrix="ov_circuit").mean("layer")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for run in ds.run.values:
        x, y = ds.eval_loss.sel(run=run).values, per.sel(run=run).values
        ax.plot(x, y, "o-", label=str(run))
        for s, xi, yi in zip(ds.step.values, x, y, strict=True):
            ax.annotate(str(int(s)), (xi, yi), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.invert_xaxis()
    ax.set_xlabel("held-out mean token loss (nats; falls to the right)")
    ax.set_ylabel("PER of the OV circuit (mean over layers)")
    ax.set_title("PER against loss, tiny HF fixtures (labels: step)")
    ax.legend()
    fig.tight_layout()
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(main(Path(sys.argv[1])))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(main(Path(tmp)))
