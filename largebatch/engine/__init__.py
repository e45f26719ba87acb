"""The training engine: run plan, loop, evaluation and run outputs."""

from largebatch.engine.run_plan import RunPlan, make_run_plan
from largebatch.engine.evaluation import evaluate
from largebatch.engine.trainer import Trainer

__all__ = ["Trainer", "evaluate", "RunPlan", "make_run_plan"]
