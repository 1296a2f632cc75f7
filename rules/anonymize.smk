rule anonymize_shard:
    """De-identify one shard's files: keyed pseudonyms and UIDs, per-patient date shifts."""
    input:
        unpack(source_inputs),
        manifest=P("ingest/manifest.csv"),
    output:
        data=directory(P("anonymize/data/{shard}")),
        manifest=P("anonymize/shards/{shard}/manifest.csv"),
        log_csv=P("anonymize/shards/{shard}/anonymization.log.csv"),
        quarantine=P("anonymize/shards/{shard}/quarantine.csv"),
    params:
        source=source_folder,  # a dicomweb source: the fetched folder, which ingest's paths are relative to
        shards=lambda w: SHARDS[w.project],
        settings=settings("anonymize"),
    resources:
        **CPU_SITE,
    log:
        P("logs/anonymize/{shard}.log"),
    benchmark:
        P("benchmarks/anonymize/{shard}.tsv")
    conda:
        "../envs/anonymize.yaml"
    shell:
        "haven anonymize {params.source:q} --ingest-manifest {input.manifest:q} --shard {wildcards.shard}/{params.shards} "
        "--data {output.data:q} --manifest {output.manifest:q} --log {output.log_csv:q} "
        "--quarantine {output.quarantine:q} --params {params.settings:q} > {log:q} 2>&1"


rule anonymize:
    """Merge the shards' pseudonymous manifests and logs (files stay in anonymize/data/<shard>/)."""
    input:
        manifests=shard_paths("anonymize/shards/{shard}/manifest.csv"),
        logs=shard_paths("anonymize/shards/{shard}/anonymization.log.csv"),
        quarantines=shard_paths("anonymize/shards/{shard}/quarantine.csv"),
        data=shard_paths("anonymize/data/{shard}"),
    output:
        manifest=P("anonymize/manifest.csv"),
        log_csv=P("anonymize/anonymization.log.csv"),
        quarantine=P("anonymize/quarantine.csv"),
    localrule: True
    log:
        P("logs/anonymize.log"),
    conda:
        "../envs/anonymize.yaml"
    shell:
        "haven merge anonymize --manifest {output.manifest:q} --log {output.log_csv:q} --quarantine {output.quarantine:q} "
        "--shard-data {input.data:q} --shard-manifests {input.manifests:q} --shard-logs {input.logs:q} "
        "--shard-quarantines {input.quarantines:q} > {log:q} 2>&1"


rule audit:
    """The safe-haven gate: re-read every output and fail on any original identifier."""
    input:
        data=shard_paths("anonymize/data/{shard}"),
        manifest=P("anonymize/manifest.csv"),
        log_csv=P("anonymize/anonymization.log.csv"),
        identifiers=P("ingest/identifiers.csv"),
        ingest_manifest=P("ingest/manifest.csv"),
    output:
        report(P("anonymize/audit.json"), caption="../workflow/report/audit.rst", category="1. Data",
               labels={"project": "{project}", "artefact": "audit"}),
    params:
        data_root=P("anonymize/data"),  # the manifest's file paths start here: <shard>/<file>
        settings=settings("audit"),
    resources:
        **CPU_SITE,
    log:
        P("logs/audit.log"),
    conda:
        "../envs/anonymize.yaml"
    shell:
        "haven audit --data {input.data:q} --data-root {params.data_root:q} --manifest {input.manifest:q} "
        "--log {input.log_csv:q} --identifiers {input.identifiers:q} --ingest-manifest {input.ingest_manifest:q} "
        "--result {output:q} --params {params.settings:q} > {log:q} 2>&1"
