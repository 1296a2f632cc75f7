# A dicomweb:// source (haven.fetch): its studies are fetched from the PACS into the PHI zone, and
# ingest reads them from there (rules/common.smk: source_inputs, source_folder).


rule fetch_shard:
    """Find the shard's studies on the DICOMweb server (QIDO-RS) and retrieve the instances not yet
    here (WADO-RS) into ingest/pacs/data/ (0700). The listing, written last, marks the shard done;
    the instances are no declared output, so a killed or rerun job keeps what it has fetched."""
    output:
        listing=P("ingest/pacs/shards/{shard}/listing.csv"),
    params:
        source=lambda w: project(w)["source"],
        data=lambda w: fetched_folder(w.project),
        shards=lambda w: SHARDS[w.project],
        settings=settings("ingest"),
    resources:
        **CPU_SITE,
    log:
        P("logs/fetch/{shard}.log"),
    benchmark:
        P("benchmarks/fetch/{shard}.tsv")
    conda:
        "../envs/ingest.yaml"
    shell:
        "haven fetch {params.source:q} --data {params.data:q} --listing {output.listing:q} "
        "--shard {wildcards.shard}/{params.shards} --params {params.settings:q} > {log:q} 2>&1"


rule fetch:
    """The shards' listings as one: ingest's source is then exactly what the query found (instances
    left from an earlier query are removed)."""
    input:
        listings=shard_paths("ingest/pacs/shards/{shard}/listing.csv"),
    output:
        listing=P("ingest/pacs/listing.csv"),
    params:
        data=lambda w: fetched_folder(w.project),
    localrule: True
    log:
        P("logs/fetch.log"),
    conda:
        "../envs/ingest.yaml"
    shell:
        "haven merge fetch --data {params.data:q} --listing {output.listing:q} "
        "--shard-listings {input.listings:q} > {log:q} 2>&1"
