rule train:
    """Transfer learning with the tuned hyperparameters; checkpoints every epoch, resumes."""
    input:
        best=P("tune/best_config.yaml"),
        train=P("preprocess/train.zarr"),
        val=P("preprocess/val.zarr"),
        stats=P("preprocess/stats.json"),
    output:
        model=P("train/model.pt"),
        history=P("train/history.csv"),
        run=P("train/run.json"),
    params:
        settings=settings("train"),
    threads: lambda w: project(w)["train"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        cpus_per_gpu=lambda w, threads: cpus_per_gpu(SITE, threads, 1),
        **GPU_SITE,
    log:
        P("logs/train.log"),
    benchmark:
        P("benchmarks/train.tsv")
    conda:
        "../envs/train.yaml"
    shell:
        "haven train $(dirname {input.stats:q}) $(dirname {output.model:q}) --best-config {input.best:q} "
        "--rule train --params {params.settings:q} > {log:q} 2>&1"
