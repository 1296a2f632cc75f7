rule report:
    """Per-project summary page and model card, the card also next to the model (the workflow
    report is `snakemake --report`)."""
    input:
        ingest=P("ingest/quarantine.csv"),
        audit=P("anonymize/audit.json"),
        stats=P("preprocess/stats.json"),
        best=P("tune/best_config.yaml"),
        search=P("tune/search.png"),
        history=P("train/history.csv"),
        run=P("train/run.json"),
        metrics=P("evaluate/metrics.json"),
        plots=expand(P("evaluate/{plot}.png"), plot=["confusion", "roc", "pr", "reliability", "subgroups", "gradcam",
                                                      "integrated_gradients", "robustness"], allow_missing=True),
    output:
        html=report(P("report/index.html"), caption="../workflow/report/summary.rst", category="0. Summary",
                    labels={"project": "{project}", "artefact": "summary"}),
        card=report(P("report/model_card.md"), caption="../workflow/report/model_card.rst", category="0. Summary",
                    labels={"project": "{project}", "artefact": "model card"}),
        card_with_model=P("train/model_card.md"),
        curves=report(P("report/training_curves.png"), caption="../workflow/report/training.rst",
                      category="2. Search", labels={"project": "{project}", "artefact": "training curves"}),
    params:
        settings=settings("report"),
        results=lambda w: f"{R}/{w.project}",
    resources:
        **CPU_SITE,
    log:
        P("logs/report.log"),
    conda:
        "../envs/evaluate.yaml"
    shell:
        "haven report {params.results:q} $(dirname {output.html:q}) --params {params.settings:q} > {log:q} 2>&1"
