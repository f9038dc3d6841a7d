"""The workflow's stages, one module each: read input artifacts, write output artifacts.

Each stage function receives its parameters as the JSON spec of muke.workflow.identity.Spec
(`spec`), writes it as a manifest.json beside its outputs and is the subcommand
`python -m muke stage <stage, dashed> ...` (muke.workflow.stages.command builds it from the
function's signature). Stages that loop over requests keep per-request part files tagged with the
job's identity, so a shard job killed midway resumes from the requests it finished. Heavy imports
(torch, transformers, lm-eval) happen inside the stages.

The package's attributes are the stage functions (`stages.generate(...)`); a stage's module is
`muke.workflow.stages.<stage>` (`from muke.workflow.stages.generate import generation_groups`, or
importlib.import_module). Its code identity covers that module and what it imports
(muke.workflow.identity), not this file.
"""

from muke.io import write_json
from muke.workflow.stages.command import add_commands
from muke.workflow.stages.common import MODEL_REF, load_model, model_path, read_memories, read_update_index
from muke.workflow.stages.prepare_model import prepare_model
from muke.workflow.stages.collect_stats import collect_stats
from muke.workflow.stages.optimize_memories import optimize_memories
from muke.workflow.stages.update_weights import update_weights
from muke.workflow.stages.generate import generate
from muke.workflow.stages.score import score
from muke.workflow.stages.locality import locality
from muke.workflow.stages.report import report

__all__ = ["MODEL_REF", "add_stage_commands", "collect_stats", "generate", "load_model", "locality", "model_path",
           "optimize_memories", "prepare_model", "read_memories", "read_update_index", "report", "score",
           "update_weights", "write_json"]


def add_stage_commands(subparsers) -> None:
    """Register `muke stage <name> ...` on the `muke` CLI's subparsers (muke.cli calls this)."""
    add_commands(subparsers)
