# stitchcache: model stitching between vision foundation models.
# Table of contents only; helpers live in workflow/rules/common.smk, stages in the rule files.
# Run: snakemake (the default profile workflow/profiles/default sets cores and the gpu resource).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/stitch.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/tree.smk"


rule all:
    input:
        all_targets(),
    default_target: True
