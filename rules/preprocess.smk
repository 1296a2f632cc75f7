rule preprocess:
    """Audited data only: patient-level splits, decode/window/resize with Dask, write Zarr."""
    input:
        audit=P("anonymize/audit.json"),
        manifest=P("anonymize/manifest.csv"),
    output:
        train=directory(P("preprocess/train.zarr")),
        val=directory(P("preprocess/val.zarr")),
        test=directory(P("preprocess/test.zarr")),
        splits=P("preprocess/splits.csv"),
        stats=P("preprocess/stats.json"),
    params:
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
        "haven preprocess $(dirname {input.manifest:q}) $(dirname {output.stats:q}) --workers {threads} "
        "--params {params.settings:q} > {log:q} 2>&1"
