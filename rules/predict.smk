# Applying the project's model to new data.  A predict source's files first pass the same gate as
# the training data (rules fetch/ingest/anonymize/audit, on the dataset <project>/predict/<source>),
# then are decoded with the training run's preprocessing and predicted; the re-identified copy and
# the DICOM SRs are written beside the source's ingest tables, in the PHI zone.


rule predict:
    """Audited new data → predictions with the training run's preprocessing, calibration and decision rule."""
    input:
        unpack(model_inputs),
        audit=dataset_path("anonymize/audit.json"),
        manifest=dataset_path("anonymize/manifest.csv"),
        data=dataset_shards("anonymize/data/{shard}"),
    output:
        predictions=P("predict/{source}/predictions.csv"),
        summary=P("predict/{source}/summary.json"),
        masks=directory(P("predict/{source}/masks")),  # a segmentation's predicted masks (others: a README)
    params:
        data=dataset_path("anonymize/data"),  # the manifest's file paths start here (inputs above)
        model=lambda w, input: model_args(w, input),
        settings=settings("predict"),
    wildcard_constraints:
        project="|".join(TRAINED) or "^$",
    threads: lambda w: project(w)["predict"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        **CPU_SITE,
    log:
        P("logs/predict/{source}.log"),
    benchmark:
        P("benchmarks/predict/{source}.tsv")
    conda:
        "../envs/predict.yaml"
    shell:
        "haven predict --manifest {input.manifest:q} --audit {input.audit:q} --data {params.data:q} {params.model} "
        "--predictions {output.predictions:q} --summary {output.summary:q} --masks {output.masks:q} "
        "--params {params.settings:q} > {log:q} 2>&1"


rule reidentify:
    """PHI zone: the predictions joined back to the original ids through the keyed pseudonyms."""
    input:
        predictions=P("predict/{source}/predictions.csv"),
        ingest_manifest=dataset_path("ingest/manifest.csv"),
    output:
        reidentified=P("predict/{source}/ingest/predictions.reidentified.csv"),
    params:
        settings=dataset_settings("reidentify"),
    wildcard_constraints:
        project="|".join(TRAINED) or "^$",
    resources:
        **CPU_SITE,
    log:
        P("logs/reidentify/{source}.log"),
    conda:
        "../envs/predict.yaml"
    shell:
        "haven reidentify --predictions {input.predictions:q} --ingest-manifest {input.ingest_manifest:q} "
        "--out {output.reidentified:q} --params {params.settings:q} > {log:q} 2>&1"


rule report_sr:
    """PHI zone: one DICOM Structured Report per original study (the finding and its probability,
    referencing the original study and instances); stored back to a PACS source when asked."""
    input:
        unpack(lambda w: source_inputs(source_wildcards(w))),
        reidentified=P("predict/{source}/ingest/predictions.reidentified.csv"),
    output:
        sr=directory(P("predict/{source}/ingest/sr")),
    params:
        source=lambda w: source_folder(source_wildcards(w)),
        store=sr_store_args,
        settings=dataset_settings("reidentify"),
    wildcard_constraints:
        project="|".join(TRAINED) or "^$",
    resources:
        **CPU_SITE,
    log:
        P("logs/report_sr/{source}.log"),
    conda:
        "../envs/predict.yaml"
    shell:
        "haven report-sr --reidentified {input.reidentified:q} --source {params.source:q} --out {output.sr:q} "
        "{params.store} --params {params.settings:q} > {log:q} 2>&1"
