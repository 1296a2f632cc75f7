rule demo_data:
    """Generate a demo dataset from installed packages (scikit-learn digits, pydicom head CT)."""
    output:
        directory(f"{DEMO_ROOT}/{{demo}}"),
    resources:
        **CPU_SITE,
    log:
        f"{R}/logs/demo_{{demo}}.log",
    wildcard_constraints:
        demo="digits|brain-ct",
    conda:
        "../envs/ingest.yaml"
    shell:
        "haven demo {wildcards.demo} {output} > {log} 2>&1"


rule ingest:
    """Walk the source into a manifest; unreadable files go to the quarantine list."""
    input:
        unpack(source_inputs),
    output:
        manifest=P("ingest/manifest.csv"),
        identifiers=P("ingest/identifiers.csv"),
        quarantine=P("ingest/quarantine.csv"),
    params:
        source=lambda w: project(w)["source"],
        settings=settings("labels", "label_key", "label_column"),
    resources:
        **CPU_SITE,
    log:
        P("logs/ingest.log"),
    benchmark:
        P("benchmarks/ingest.tsv")
    conda:
        "../envs/ingest.yaml"
    shell:
        "haven ingest {params.source:q} $(dirname {output.manifest:q}) "
        "--params {params.settings:q} > {log:q} 2>&1"
