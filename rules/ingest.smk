rule demo_data:
    """Generate a demo dataset from installed packages (scikit-learn digits, pydicom head CT, scikit-image fundus, nilearn MNI152 brain)."""
    output:
        directory(f"{DEMO_ROOT}/{{demo}}"),
    resources:
        **CPU_SITE,
    log:
        f"{R}/logs/demo_{{demo}}.log",
    wildcard_constraints:
        demo="digits|brain-ct|retinopathy|brain-mri|digits-new|brain-ct-new|retinopathy-new|brain-mri-new",
    conda:
        "../envs/ingest.yaml"
    shell:
        "haven demo {wildcards.demo} {output} > {log} 2>&1"


rule ingest_shard:
    """Walk the source; read the files of one shard into a manifest, unreadable ones quarantined."""
    input:
        unpack(source_inputs),
    output:
        manifest=P("ingest/shards/{shard}/manifest.csv"),
        identifiers=P("ingest/shards/{shard}/identifiers.csv"),
        quarantine=P("ingest/shards/{shard}/quarantine.csv"),
    params:
        source=source_folder,
        shards=lambda w: SHARDS[w.project],
        settings=settings("ingest"),
    resources:
        **CPU_SITE,
    log:
        P("logs/ingest/{shard}.log"),
    benchmark:
        P("benchmarks/ingest/{shard}.tsv")
    conda:
        "../envs/ingest.yaml"
    shell:
        "haven ingest {params.source:q} --manifest {output.manifest:q} --identifiers {output.identifiers:q} "
        "--quarantine {output.quarantine:q} --shard {wildcards.shard}/{params.shards} "
        "--params {params.settings:q} > {log:q} 2>&1"


rule ingest:
    """Merge the shards: one manifest, identifier list and quarantine list (duplicates across shards
    quarantined)."""
    input:
        # the label table (the merge counts its rows no file matched); a demo's is in its generated folder
        labels=lambda w: ([] if not project(w)["labels"]
                          else source_inputs(w)["source"] if project(w)["demo"] else project(w)["labels"]),
        manifests=shard_paths("ingest/shards/{shard}/manifest.csv"),
        identifiers=shard_paths("ingest/shards/{shard}/identifiers.csv"),
        quarantines=shard_paths("ingest/shards/{shard}/quarantine.csv"),
    output:
        manifest=P("ingest/manifest.csv"),
        identifiers=P("ingest/identifiers.csv"),
        quarantine=P("ingest/quarantine.csv"),
    params:
        settings=settings("ingest"),
    localrule: True
    log:
        P("logs/ingest.log"),
    conda:
        "../envs/ingest.yaml"
    shell:
        "haven merge ingest --manifest {output.manifest:q} --identifiers {output.identifiers:q} "
        "--quarantine {output.quarantine:q} --shard-manifests {input.manifests:q} "
        "--shard-identifiers {input.identifiers:q} --shard-quarantines {input.quarantines:q} "
        "--params {params.settings:q} > {log:q} 2>&1"
