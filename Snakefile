# haven: de-identify, preprocess, tune, train and evaluate image models, one DAG per project.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/fetch.smk"
include: "rules/ingest.smk"
include: "rules/anonymize.smk"
include: "rules/preprocess.smk"
include: "rules/tune.smk"
include: "rules/train.smk"
include: "rules/cv.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/track.smk"
include: "rules/package.smk"
include: "rules/predict.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
