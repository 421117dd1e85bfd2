"""Safety evaluation: eval sets, refusal and trace scorers, metrics, reports.

    examples = load_eval_sets(["bundled", "xstest=data/xstest.csv"])
    result = run_eval(model, tokenizer, examples, SamplingConfig(max_new_tokens=256))
    write_report("runs/eval", result, baseline=None)

Imports generate, models and data; never the CLI. Matplotlib loads only to draw plots.
"""

from safer_jax.evaluation.judge import CallableJudge, JudgeVerdict, LocalModelJudge, OpenAIJudge
from safer_jax.evaluation.refusal import RefusalVerdict, classify_refusal
from safer_jax.evaluation.result import EvalResult
from safer_jax.evaluation.runner import evaluate, load_model, run_eval, write_report
from safer_jax.evaluation.scoring import ScoreOptions, score
from safer_jax.evaluation.sets import PRESETS, ColumnMap, EvalExample, load_eval_sets, load_file

__all__ = [
    "PRESETS",
    "CallableJudge",
    "ColumnMap",
    "EvalExample",
    "EvalResult",
    "JudgeVerdict",
    "LocalModelJudge",
    "OpenAIJudge",
    "RefusalVerdict",
    "ScoreOptions",
    "classify_refusal",
    "evaluate",
    "load_eval_sets",
    "load_file",
    "load_model",
    "run_eval",
    "score",
    "write_report",
]
