"""Live logging of a training run to TensorBoard or Weights & Biases (`dynlab train --log`).

Every line the trainer writes to metrics.jsonl is also logged, at its step, as

    train/loss, train/lr, train/tokens, train/tokens_per_second, train/wall_seconds,
    train/gpu_hours, train/relora_cycle (relora)
    eval/ppl_macro, eval/ppl/<domain>, eval/blimp_overall, eval/blimp/<uid>,
    eval/blimp_field/<field>                                   (when the step was evaluated)

TensorBoard: event files in RUN/tensorboard/; W&B: an offline run in RUN/wandb/ (wandb's
offline mode, no network; `wandb sync RUN/wandb/offline-run-*` uploads it). The writers are
dynlab.analysis.export's, so `dynlab export` and the live log use the same files. Only rank 0
logs. A resumed run logs again from its checkpoint on (TensorBoard shows the later points).
"""

from __future__ import annotations

import math
from pathlib import Path

#: metrics.jsonl fields logged as train/<field>
TRAIN_FIELDS = ("loss", "lr", "tokens", "tokens_per_second", "wall_seconds", "gpu_hours",
                "relora_cycle")


def finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def live_scalars(record: dict) -> dict[str, float]:
    """Tag -> value of one metrics.jsonl record (module docstring); missing and non-finite
    values are left out."""
    out = {f"train/{k}": float(record[k]) for k in TRAIN_FIELDS if finite(record.get(k))}
    ev = record.get("eval") or {}
    ppl, blimp = ev.get("perplexity") or {}, ev.get("blimp") or {}
    if finite(ppl.get("macro")):
        out["eval/ppl_macro"] = float(ppl["macro"])
    out.update({f"eval/ppl/{d}": float(v) for d, v in (ppl.get("by_domain") or {}).items()
                if finite(v)})
    if finite(blimp.get("overall")):
        out["eval/blimp_overall"] = float(blimp["overall"])
    for part, prefix in (("by_uid", "eval/blimp/"), ("by_field", "eval/blimp_field/")):
        out.update({prefix + str(k): float(v) for k, v in (blimp.get(part) or {}).items()
                    if finite(v)})
    return out


class LiveLog:
    """Logs metrics.jsonl records to `fmt` ("tensorboard" or "wandb") under the run."""

    def __init__(self, fmt: str, run_dir: Path, config: dict | None = None) -> None:
        from dynlab.analysis.export import open_logger

        run_dir = Path(run_dir)  # wandb makes its own wandb/ folder in the directory given
        where = run_dir / "tensorboard" if fmt == "tensorboard" else run_dir
        self.logger = open_logger(fmt, where, run_dir.name, config)

    def write(self, record: dict) -> None:
        self.logger.scalars(int(record["step"]), live_scalars(record))

    def close(self) -> None:
        self.logger.close()
