"""lm-eval's own IFEval scoring, re-exported so that local YAML files can name it with `!function`."""

from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results

__all__ = ["agg_inst_level_acc", "process_results"]
