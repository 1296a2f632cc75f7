# The evaluate plots the page shows: every PNG rule evaluate writes, by its output name (the page
# places each by that name). Taken from rule evaluate itself so the list exists once.
EVALUATE_PLOTS = [name for name, path in rules.evaluate.output.items() if path.endswith(".png")]


rule report:
    """Per-project summary page and model card, the card also next to the model (the workflow
    report is `snakemake --report`)."""
    input:
        ingest_quarantine=P("ingest/quarantine.csv"),
        anonymize_quarantine=P("anonymize/quarantine.csv"),
        audit=P("anonymize/audit.json"),
        stats=P("preprocess/stats.json"),
        best=P("tune/best_config.yaml"),
        trials=P("tune/trials.csv"),
        search=P("tune/search.png"),
        history=P("train/history.csv"),
        run=P("train/run.json"),
        metrics=P("evaluate/metrics.json"),
        plots=[str(getattr(rules.evaluate.output, name)) for name in EVALUATE_PLOTS],
        predict=lambda w: list(report_predict_inputs(w).values()),
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
        # NAME=PATH for each of input.plots, in EVALUATE_PLOTS' order
        plots=lambda w, input: [f"{name}={path}" for name, path in zip(EVALUATE_PLOTS, input.plots)],
        # SOURCE=PATH for each of input.predict
        predict=lambda w, input: [f"{s}={path}" for s, path in report_predict_inputs(w).items()],
    resources:
        **CPU_SITE,
    log:
        P("logs/report.log"),
    conda:
        "../envs/evaluate.yaml"
    shell:
        # every file the stage reads or writes is named here; it builds no path of its own
        "haven report --ingest-quarantine {input.ingest_quarantine:q} "
        "--anonymize-quarantine {input.anonymize_quarantine:q} --audit {input.audit:q} --stats {input.stats:q} "
        "--best {input.best:q} --trials {input.trials:q} --search {input.search:q} --history {input.history:q} "
        "--run {input.run:q} --metrics {input.metrics:q} --plot {params.plots:q} --predict {params.predict:q} "
        "--html {output.html:q} --card {output.card:q} --card-with-model {output.card_with_model:q} "
        "--curves {output.curves:q} --params {params.settings:q} > {log:q} 2>&1"
