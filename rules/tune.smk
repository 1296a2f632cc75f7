rule tune:
    """Ray Tune (ASHA + Optuna) over the project's search space; MLflow parent + child runs.
    Trials checkpoint every epoch; an interrupted search resumes (Tuner.restore)."""
    input:
        train=P("preprocess/train.zarr"),
        val=P("preprocess/val.zarr"),
        stats=P("preprocess/stats.json"),
        splits=P("preprocess/splits.csv"),
    output:
        best=P("tune/best_config.yaml"),
        trials=P("tune/trials.csv"),
        history=P("tune/history.csv"),
        plot=report(P("tune/search.png"), caption="../workflow/report/search.rst", category="2. Search",
                    labels={"project": "{project}", "artefact": "search"}),
    params:
        settings=settings("tune"),
        # Ray's search state and the trials' checkpoints (an interrupted search resumes from them);
        # not an output: Snakemake would delete it before a re-run
        storage=P("tune/ray"),
    threads: lambda w: project(w)["tune"]["cpus"]
    resources:
        mem_mb=8000,
        runtime=240,
        # Slurm geometry (a profile's set-resources wins): `gpus` GPUs and `cpus` CPUs per node;
        # several nodes get one task each and Ray is started on every node (haven.learn.tune)
        nodes=lambda w: project(w)["tune"]["nodes"],
        tasks=lambda w: project(w)["tune"]["nodes"] if project(w)["tune"]["nodes"] > 1 else 0,
        gpu=lambda w: project(w)["tune"]["gpus"] * project(w)["tune"]["nodes"],
        cpus_per_gpu=lambda w, threads: cpus_per_gpu(SITE, threads, project(w)["tune"]["gpus"]),
        **GPU_SITE,
    log:
        P("logs/tune.log"),
    benchmark:
        P("benchmarks/tune.tsv")
    conda:
        "../envs/tune.yaml"
    shell:
        "haven tune --train {input.train:q} --val {input.val:q} --stats {input.stats:q} --splits {input.splits:q} "
        "--best {output.best:q} --trials {output.trials:q} --history {output.history:q} --plot {output.plot:q} "
        "--ray-storage {params.storage:q} --cpus {threads} --rule tune --params {params.settings:q} > {log:q} 2>&1"
