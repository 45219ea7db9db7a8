"""dynlab.runs: the one owner of a run directory on disk.

    RUN/run.json                      options, model shape, ReLoRA reset steps (config.py)
    RUN/tokenizer.json
    RUN/metrics.jsonl                 one JSON line per logged step (metrics.py)
    RUN/checkpoints/step_<N>/         (layout.py)
        weights.safetensors, grads.safetensors, activations.safetensors (optional),
        trainer_state.pt (resume state), meta.json (written last: the checkpoint is
        complete once it exists), eval.json (a standalone `dynlab eval`)

Modules: `layout` (step folders, completeness, cleaning), `files` (atomic writes, meta.json
and eval.json, trainer_state.pt), `metrics` (metrics.jsonl), `config` (the model's shape and
the reset steps of a ReLoRA run), `checkpoints` (runs and checkpoints as read for analysis).
"""
