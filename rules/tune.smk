rule tune:
    """Ray Tune (ASHA + Optuna) over the project's search space; MLflow parent + child runs."""
    input:
        train=P("preprocess/train.zarr"),
        val=P("preprocess/val.zarr"),
        stats=P("preprocess/stats.json"),
    output:
        best=P("tune/best_config.yaml"),
        trials=P("tune/trials.csv"),
        plot=report(P("tune/search.png"), caption="../workflow/report/search.rst", category="2. Search",
                    labels={"project": "{project}", "artefact": "search"}),
    params:
        settings=settings("model", "train", "tune"),
    threads: lambda w: project(w)["tune"]["cpus"]
    resources:
        mem_mb=8000,
        runtime=240,
    log:
        P("logs/tune.log"),
    benchmark:
        P("benchmarks/tune.tsv")
    conda:
        "../envs/tune.yaml"
    shell:
        "haven tune $(dirname {input.stats:q}) $(dirname {output.best:q}) --rule tune "
        "--params {params.settings:q} > {log:q} 2>&1"
