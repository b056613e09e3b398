# attnspace: "Attention Layers Add Into Low-Dimensional Residual Subspaces", end to end.
#
#   snakemake --cores all                      embedded default (config.yaml)
#   snakemake --cores all fig1                 one figure, by name
#   snakemake --cores all results/figures/fig2a.pdf
#   snakemake --workflow-profile profiles/slurm --configfile config/paper.yaml
#
# Stages, in order: rules/models.smk -> tokens.smk -> cache.smk -> spectra.smk -> figures.smk,
# then interventions.smk (loss recovered, Figure 2B), wo.smk (W^O decomposition, Figure 3),
# sae.smk (SAE training, Figures 5-7), dead_features.smk (Figure 4), lorsa.smk (Table 1) and
# report.smk (the claims table; `snakemake gallery` refreshes docs/gallery and the README's blocks)

import os

from attnspace.config import check_config, check_models_on_disk
from attnspace.strict_yaml import read_config_files


# The embedded default, unless --configfile names another (never merged with it).
if not config:

    configfile: os.path.join(workflow.basedir, "config.yaml")


# Every configuration file read again by attnspace's strict loader (the one `attnspace plan` uses):
# a key given twice, a YAML 1.1 octal or sexagesimal number or aliases that expand without bound are
# refused in one line; --config overrides apply last, as Snakemake applies them.
_strict = read_config_files(workflow.configfiles, workflow.config_settings.config)
config.clear()
config.update(_strict)

# JSON-Schema validation (defaults filled in), the checks a schema cannot make, and the
# declared model shapes against the models' own metadata already on disk, before any
# job: one message naming the key and the fix.
check_config(config)
check_models_on_disk(config)


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/tokens.smk"
include: "rules/cache.smk"
include: "rules/spectra.smk"
include: "rules/figures.smk"
include: "rules/interventions.smk"
include: "rules/wo.smk"
include: "rules/sae.smk"
include: "rules/dead_features.smk"
include: "rules/lorsa.smk"
include: "rules/report.smk"


report: "docs/report.rst"


# A real run (never a dry run: Snakemake calls onstart only when jobs are about to execute)
# first prints the plan of the jobs it will run (disk, activation rows, model-forward tokens,
# optimizer steps, GPU-hours), read off this run's own DAG, as `attnspace plan` does from a
# dry run. A plan that cannot be computed is reported and does not stop the run. Imported here,
# so that loading the workflow (snakemake -n) does not pay for it.
onstart:
    from attnspace.cli import build_parser
    from attnspace.plan import print_run_plan

    print_run_plan(workflow.dag.needrun_jobs(), config, build_parser())


rule all:
    input:
        figure_targets(),
        "results/tables/table1_lorsa.md",
        "results/claims.md",
        stage_tables(),
    default_target: True
    localrule: True
