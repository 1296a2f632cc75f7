rule anonymize:
    """De-identify every ingested file: keyed pseudonyms and UIDs, per-patient date shifts."""
    input:
        unpack(source_inputs),
        manifest=P("ingest/manifest.csv"),
    output:
        data=directory(P("anonymize/data")),
        manifest=P("anonymize/manifest.csv"),
        log_csv=P("anonymize/anonymization.log.csv"),
        quarantine=P("anonymize/quarantine.csv"),
    params:
        source=lambda w: project(w)["source"],
        settings=settings("anonymize", secrets=True),
    resources:
        **CPU_SITE,
    log:
        P("logs/anonymize.log"),
    benchmark:
        P("benchmarks/anonymize.tsv")
    conda:
        "../envs/anonymize.yaml"
    shell:
        "haven anonymize {params.source:q} $(dirname {input.manifest:q}) $(dirname {output.manifest:q}) "
        "--params {params.settings:q} > {log:q} 2>&1"


rule audit:
    """The safe-haven gate: re-read every output and fail on any original identifier."""
    input:
        data=P("anonymize/data"),
        manifest=P("anonymize/manifest.csv"),
        log_csv=P("anonymize/anonymization.log.csv"),
        identifiers=P("ingest/identifiers.csv"),
    output:
        report(P("anonymize/audit.json"), caption="../workflow/report/audit.rst", category="1. Data",
               labels={"project": "{project}", "artefact": "audit"}),
    resources:
        **CPU_SITE,
    log:
        P("logs/audit.log"),
    conda:
        "../envs/anonymize.yaml"
    shell:
        "haven audit $(dirname {input.manifest:q}) --ingest $(dirname {input.identifiers:q}) > {log:q} 2>&1"
