"""The workflow's stages, one module each: read input artifacts, write output artifacts.

Each stage function receives its parameters as the JSON spec of muke.workflow.identity.Spec
(`spec`), writes it as a manifest.json beside its outputs and is the subcommand
`python -m muke stage <stage, dashed> ...` (muke.workflow.stages.command builds it from the
function's signature). Stages that loop over requests keep per-request part files tagged with the
job's identity, so a shard job killed midway resumes from the requests it finished. Heavy imports
(torch, transformers, lm-eval) happen inside the stages.

This package exports nothing: import a stage function, or a helper, from the module defining it
(`from muke.workflow.stages.generate import generate`, `from muke.workflow.stages.common import
load_model`). A stage's code identity covers its module and what that imports
(muke.workflow.identity), not this file.
"""
