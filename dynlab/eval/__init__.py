"""dynlab.eval: perplexity per domain (Paloma's convention) and BLiMP accuracy.

    from dynlab.eval import default_eval_data, load_eval_data, evaluate
    result = evaluate(model, tokenizer, default_eval_data())
    # {"perplexity": {"by_domain": {...}, "macro": x},
    #  "blimp": {"by_uid": {...}, "by_field": {...}, "overall": x}}
"""

from dynlab.eval.core import EvalData, default_eval_data, evaluate, load_eval_data
from dynlab.eval.perplexity import EvalDataWarning
from dynlab.eval.runs import (
    CheckpointEvalError,
    evaluate_checkpoint,
    evaluate_run,
    find_checkpoints,
)

__all__ = [
    "CheckpointEvalError", "EvalData", "EvalDataWarning", "default_eval_data", "evaluate",
    "evaluate_checkpoint", "evaluate_run", "find_checkpoints", "load_eval_data",
]
