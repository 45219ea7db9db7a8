"""Evaluation during training: dynlab.eval.evaluate at the evaluation steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dynlab.data.documents import DEFAULT_DATA
from dynlab.eval import EvalData, default_eval_data, evaluate, load_eval_data
from dynlab.model.relora import relora_modules, unwrap
from dynlab.training.config import TrainConfig
from dynlab.training.rng import preserved_rng


class EvalHook:
    """Evaluates the model at steps divisible by `eval_every` and at the last step; the
    evaluation data is loaded once, at the first evaluation. Off when eval_every is 0, and
    for a custom --data without --eval-ppl / --eval-blimp (said once through `say`)."""

    def __init__(self, cfg: TrainConfig, tokenizer, device: torch.device,
                 say: Callable[[str], None]) -> None:
        self.cfg, self.tokenizer, self.device, self.say = cfg, tokenizer, device, say
        self.enabled = cfg.eval_every > 0
        self.data: EvalData | None = None

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and (step % self.cfg.eval_every == 0 or last)

    def load(self) -> EvalData | None:
        """The evaluation data of the run's options, or None (and the hook off)."""
        cfg = self.cfg
        if cfg.eval_ppl or cfg.eval_blimp:
            return load_eval_data(cfg.eval_ppl, cfg.eval_blimp)
        if cfg.data == DEFAULT_DATA:
            return default_eval_data(cfg.eval_ppl_docs, cfg.eval_pairs_per_uid)
        self.say("evaluation off: custom --data without --eval-ppl/--eval-blimp")
        self.enabled = False
        return None

    def __call__(self, model: nn.Module) -> dict | None:
        """The evaluation of `model`; loading the data, unwrapping a relora model and
        evaluating all run inside `preserved_rng`, so the training RNG never moves."""
        with preserved_rng(self.device):
            if self.data is None and self.enabled:
                self.data = self.load()
            if not self.enabled or self.data is None:
                return None
            plain = unwrap(model) if relora_modules(model) else model
            return evaluate(plain, self.tokenizer, self.data, device=str(self.device),
                            batch_size=self.cfg.eval_batch_size, max_seq_len=self.cfg.seq_len)
