rule train:
    """Transfer learning with the tuned hyperparameters; checkpoints every epoch, resumes."""
    wildcard_constraints:
        # a cross-validated project's train/model.pt is the ensemble of its folds (rules/cv.smk)
        project=one_of([p for p in TRAINED if p not in CV]),
    input:
        best=P("tune/best_config.yaml"),
        train=P("preprocess/train.zarr"),
        val=P("preprocess/val.zarr"),
        stats=P("preprocess/stats.json"),
        splits=P("preprocess/splits.csv"),
    output:
        model=P("train/model.pt"),
        history=P("train/history.csv"),
        run=P("train/run.json"),
    params:
        settings=settings("train"),
        # holds checkpoints/last.pt (a killed run resumes from it): not an output, which Snakemake
        # would delete before the re-run
        workdir=P("train"),
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
        "haven train --train {input.train:q} --val {input.val:q} --stats {input.stats:q} --splits {input.splits:q} "
        "--best-config {input.best:q} --model {output.model:q} --history {output.history:q} --summary {output.run:q} "
        "--workdir {params.workdir:q} --rule train --params {params.settings:q} > {log:q} 2>&1"
