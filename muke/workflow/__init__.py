"""The workflow layer under the Snakefile: configuration, stage identities, the plan of jobs and one
module per stage. The library below it (engine, update, eval) knows nothing of this package."""
