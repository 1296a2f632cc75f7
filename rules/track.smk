rule register:
    """MLflow model registry: the project's final model (the pyfunc package: files in, the training
    run's preprocessing inside) as a new version of <registry_prefix><project>, with its test
    metrics and a link to its report, the ONNX export beside it; alias `champion` = best version."""
    input:
        model=P("train/model.pt"),
        run=P("train/run.json"),
        metrics=P("evaluate/metrics.json"),
        onnx=P("train/model.onnx"),
        onnx_report=P("train/onnx.json"),
    output:
        P("track/registered.json"),
    params:
        settings=settings("register"),
        # linked from the version, not read: rule report runs after register (it shows the registered
        # model's predictions on new data) and logs the page and card to the train run itself
        report=P("report/index.html"),
    resources:
        **CPU_SITE,
    log:
        P("logs/register.log"),
    conda:
        "../envs/track.yaml"
    shell:
        "haven register --model {input.model:q} --run {input.run:q} --metrics {input.metrics:q} "
        "--report {params.report:q} --onnx {input.onnx:q} --onnx-report {input.onnx_report:q} "
        "--out {output:q} "
        "--rule register --params {params.settings:q} > {log:q} 2>&1"


rule compare:
    """Each project's best run with its metrics side by side (from MLflow) → results/compare.csv."""
    input:
        expand(P("track/registered.json") if config["register_models"] else P("evaluate/metrics.json"),
               project=TRAINED),
    output:
        f"{R}/compare.csv",
    params:
        settings=json.dumps(compare_settings(config), sort_keys=True),
    resources:
        **CPU_SITE,
    log:
        f"{R}/logs/compare.log",
    conda:
        "../envs/track.yaml"
    shell:
        "haven compare --params {params.settings:q} --out {output:q} > {log:q} 2>&1"
