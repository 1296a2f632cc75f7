rule evaluate:
    """Held-out test split: metrics with bootstrap CIs, calibration, subgroup audit, Grad-CAM/IG with
    the randomization check, FGSM/PGD robustness; all logged to the train run in MLflow."""
    input:
        model=P("train/model.pt"),
        run=P("train/run.json"),
        test=P("preprocess/test.zarr"),
        val=P("preprocess/val.zarr"),
        stats=P("preprocess/stats.json"),
    output:
        metrics=P("evaluate/metrics.json"),
        subgroups_table=P("evaluate/subgroups.csv"),
        confusion=report(P("evaluate/confusion.png"), caption="../workflow/report/confusion.rst", category="3. Evaluation",
            labels={"project": "{project}", "artefact": "confusion"}),
        roc=report(P("evaluate/roc.png"), caption="../workflow/report/roc.rst", category="3. Evaluation",
            labels={"project": "{project}", "artefact": "roc"}),
        pr=report(P("evaluate/pr.png"), caption="../workflow/report/pr.rst", category="3. Evaluation",
            labels={"project": "{project}", "artefact": "pr"}),
        reliability=report(P("evaluate/reliability.png"), caption="../workflow/report/reliability.rst", category="4. Calibration",
            labels={"project": "{project}", "artefact": "reliability"}),
        subgroups=report(P("evaluate/subgroups.png"), caption="../workflow/report/subgroups.rst", category="5. Bias",
            labels={"project": "{project}", "artefact": "subgroups"}),
        gradcam=report(P("evaluate/gradcam.png"), caption="../workflow/report/gradcam.rst", category="6. Interpretability",
            labels={"project": "{project}", "artefact": "gradcam"}),
        integrated_gradients=report(P("evaluate/integrated_gradients.png"), caption="../workflow/report/integrated_gradients.rst", category="6. Interpretability",
            labels={"project": "{project}", "artefact": "integrated gradients"}),
        robustness=report(P("evaluate/robustness.png"), caption="../workflow/report/robustness.rst", category="7. Robustness",
            labels={"project": "{project}", "artefact": "robustness"}),
        overlays=report(P("evaluate/overlays.png"), caption="../workflow/report/overlays.rst", category="3. Evaluation",
            labels={"project": "{project}", "artefact": "overlays"}),
    params:
        settings=settings("evaluate"),
        # written beside the outputs but not declared ones (nothing downstream reads them)
        predictions=P("evaluate/predictions.npz"),
        explain_maps=P("evaluate/explain.npz"),
    threads: lambda w: project(w)["evaluate"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        **CPU_SITE,
    log:
        P("logs/evaluate.log"),
    benchmark:
        P("benchmarks/evaluate.tsv")
    conda:
        "../envs/evaluate.yaml"
    shell:
        # every file the stage reads or writes is named here; it builds no path of its own
        # (input.stats is not read: mean/std travel in the Zarr stores; it stays an input so the
        # job's inputs and rerun triggers are what they were)
        "haven evaluate --model {input.model:q} --run {input.run:q} --test {input.test:q} --val {input.val:q} "
        "--metrics {output.metrics:q} --subgroups-table {output.subgroups_table:q} "
        "--predictions {params.predictions:q} --explain-maps {params.explain_maps:q} "
        "--plot confusion={output.confusion:q} --plot roc={output.roc:q} --plot pr={output.pr:q} "
        "--plot reliability={output.reliability:q} --plot subgroups={output.subgroups:q} "
        "--plot gradcam={output.gradcam:q} --plot integrated_gradients={output.integrated_gradients:q} "
        "--plot robustness={output.robustness:q} --plot overlays={output.overlays:q} "
        "--rule evaluate --params {params.settings:q} > {log:q} 2>&1"
