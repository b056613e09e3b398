# attnspace: "Attention Layers Add Into Low-Dimensional Residual Subspaces", end to end.
#
#   snakemake --cores all                      embedded default (config.yaml)
#   snakemake --cores all fig1                 one figure, by name
#   snakemake --cores all results/figures/fig2a.pdf
#   snakemake --workflow-profile profiles/slurm --configfile config/paper.yaml
#
# Stages, in order: rules/models.smk -> tokens.smk -> cache.smk -> spectra.smk -> figures.smk

import os

from attnspace.config import check_config


# The embedded default, unless --configfile names another (never merged with it).
if not config:

    configfile: os.path.join(workflow.basedir, "config.yaml")



# JSON-Schema validation (defaults filled in) and the checks a schema cannot make,
# before any job: one message naming the key and the fix.
check_config(config)


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/tokens.smk"
include: "rules/cache.smk"
include: "rules/spectra.smk"
include: "rules/figures.smk"


rule all:
    input:
        figure_targets(),
    default_target: True
    localrule: True
