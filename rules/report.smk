rule report:
    """Per-project summary page and model card (the workflow report is `snakemake --report`)."""
    input:
        ingest=P("ingest/quarantine.csv"),
        audit=P("anonymize/audit.json"),
        stats=P("preprocess/stats.json"),
        best=P("tune/best_config.yaml"),
        history=P("train/history.csv"),
        run=P("train/run.json"),
        metrics=P("evaluate/metrics.json"),
    output:
        html=report(P("report/index.html"), caption="../workflow/report/summary.rst", category="0. Summary",
                    labels={"project": "{project}", "artefact": "summary"}),
        card=P("report/model_card.md"),
    params:
        settings=settings("model", "train", "tune"),
        results=lambda w: f"{R}/{w.project}",
    log:
        P("logs/report.log"),
    conda:
        "../envs/evaluate.yaml"
    shell:
        "haven report {params.results:q} $(dirname {output.html:q}) --params {params.settings:q} > {log:q} 2>&1"
