rule preprocess:
    """Audited data only: patient-level splits, decode/window/resize with Dask, write Zarr."""
    input:
        audit=P("anonymize/audit.json"),
        manifest=P("anonymize/manifest.csv"),
        data=shard_paths("anonymize/data/{shard}"),
    output:
        train=directory(P("preprocess/train.zarr")),
        val=directory(P("preprocess/val.zarr")),
        test=directory(P("preprocess/test.zarr")),
        splits=P("preprocess/splits.csv"),
        stats=P("preprocess/stats.json"),
    params:
        data=P("anonymize/data"),  # the manifest's file paths start here: <shard>/<file> (inputs above)
        settings=settings("preprocess"),
    threads: lambda w: project(w)["preprocess"]["workers"]
    resources:
        mem_mb=4000,
        runtime=60,
        **CPU_SITE,
    log:
        P("logs/preprocess.log"),
    benchmark:
        P("benchmarks/preprocess.tsv")
    conda:
        "../envs/preprocess.yaml"
    shell:
        "haven preprocess --manifest {input.manifest:q} --audit {input.audit:q} --data {params.data:q} "
        "--train {output.train:q} --val {output.val:q} --test {output.test:q} --splits {output.splits:q} "
        "--stats {output.stats:q} --workers {threads} --params {params.settings:q} > {log:q} 2>&1"
