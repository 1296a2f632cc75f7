# Packaging the trained model for deployment: the network as ONNX (haven.predict.onnx), checked
# against torch on the test split; the register stage logs both files to the train run.  (The
# MLflow pyfunc package, with the preprocessing inside, is logged by the register stage itself.)


rule export_onnx:
    """The trained network as ONNX (dynamo exporter, opset 18, dynamic batch); fails when the
    onnxruntime probabilities on the test split differ from torch's by more than 1e-4."""
    input:
        model=P("train/model.pt"),
        test=P("preprocess/test.zarr"),
    output:
        onnx=P("train/model.onnx"),
        report=P("train/onnx.json"),
    params:
        settings=lambda w, threads: json.dumps({"threads": threads}),
    wildcard_constraints:
        project="|".join(TRAINED) or "^$",
    threads: lambda w: project(w)["evaluate"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
        **CPU_SITE,
    log:
        P("logs/export_onnx.log"),
    benchmark:
        P("benchmarks/export_onnx.tsv")
    conda:
        "../envs/predict.yaml"
    shell:
        "haven export-onnx --model {input.model:q} --test {input.test:q} --onnx {output.onnx:q} "
        "--report {output.report:q} --params {params.settings:q} > {log:q} 2>&1"
