rule evaluate:
    """Held-out test split: metrics, confusion matrix and ROC, logged to the train run."""
    input:
        model=P("train/model.pt"),
        run=P("train/run.json"),
        test=P("preprocess/test.zarr"),
        stats=P("preprocess/stats.json"),
    output:
        metrics=P("evaluate/metrics.json"),
        confusion=report(P("evaluate/confusion.png"), caption="../workflow/report/confusion.rst",
                         category="3. Evaluation", labels={"project": "{project}", "artefact": "confusion"}),
        roc=report(P("evaluate/roc.png"), caption="../workflow/report/roc.rst", category="3. Evaluation",
                   labels={"project": "{project}", "artefact": "roc"}),
    params:
        settings=settings("evaluate"),
    log:
        P("logs/evaluate.log"),
    benchmark:
        P("benchmarks/evaluate.tsv")
    conda:
        "../envs/evaluate.yaml"
    shell:
        "haven evaluate {input.model:q} $(dirname {input.stats:q}) $(dirname {output.metrics:q}) "
        "--run {input.run:q} --rule evaluate --params {params.settings:q} > {log:q} 2>&1"
