# k-fold cross-validation (`cv.folds` >= 2): the train split's patients in folds, one train job per
# fold, and their ensemble as the project's train/model.pt (what evaluate, register and predict use).


rule cv_folds:
    """The train split's patients in cv.folds folds (stratified by label), one Zarr store each."""
    wildcard_constraints:
        project=one_of(CV),
    input:
        train=P("preprocess/train.zarr"),
    output:
        folds=directory(P("cv/folds")),
        table=P("cv/folds.csv"),
    params:
        settings=settings("folds"),
    resources:
        mem_mb=2000,
        runtime=30,
        **CPU_SITE,
    log:
        P("logs/cv_folds.log"),
    conda:
        "../envs/preprocess.yaml"
    shell:
        "haven folds --train {input.train:q} --out {output.folds:q} --table {output.table:q} "
        "--rule cv_folds --params {params.settings:q} > {log:q} 2>&1"


rule train_fold:
    """One fold's network: trained on the other folds, early-stopped on its own."""
    wildcard_constraints:
        project=one_of(CV),
        fold=r"\d+",
    input:
        best=P("tune/best_config.yaml"),
        folds=P("cv/folds"),
        stats=P("preprocess/stats.json"),
        splits=P("preprocess/splits.csv"),
    output:
        model=P("cv/fold{fold}/model.pt"),
        history=P("cv/fold{fold}/history.csv"),
        run=P("cv/fold{fold}/run.json"),
    params:
        settings=settings("train"),
        # the fold stores inside input.folds: the others to train on, its own to validate on
        train=fold_train_stores,
        val=fold_val_store,
        workdir=P("cv/fold{fold}"),
    threads: lambda w: project(w)["train"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        cpus_per_gpu=lambda w, threads: cpus_per_gpu(SITE, threads, 1),
        **GPU_SITE,
    log:
        P("logs/train_fold{fold}.log"),
    benchmark:
        P("benchmarks/train_fold{fold}.tsv")
    conda:
        "../envs/train.yaml"
    shell:
        "haven train --train {params.train} --val {params.val:q} --stats {input.stats:q} --splits {input.splits:q} "
        "--best-config {input.best:q} --model {output.model:q} --history {output.history:q} --summary {output.run:q} "
        "--workdir {params.workdir:q} --fold {wildcards.fold} --rule train_fold --params {params.settings:q} > {log:q} 2>&1"


rule ensemble:
    """The folds' networks as one model (averaged probabilities): the project's train/model.pt."""
    wildcard_constraints:
        project=one_of(CV),
    input:
        models=fold_paths("cv/fold{fold}/model.pt"),
        runs=fold_paths("cv/fold{fold}/run.json"),
        histories=fold_paths("cv/fold{fold}/history.csv"),
        table=P("cv/folds.csv"),
        stats=P("preprocess/stats.json"),
    output:
        model=P("train/model.pt"),
        history=P("train/history.csv"),
        run=P("train/run.json"),
    params:
        settings=settings("ensemble"),
    resources:
        mem_mb=4000,
        runtime=30,
        **CPU_SITE,
    log:
        P("logs/ensemble.log"),
    conda:
        "../envs/train.yaml"
    shell:
        "haven ensemble --fold-model {input.models:q} --fold-run {input.runs:q} --fold-history {input.histories:q} "
        "--folds {input.table:q} --stats {input.stats:q} --model {output.model:q} --history {output.history:q} "
        "--summary {output.run:q} --rule ensemble --params {params.settings:q} > {log:q} 2>&1"
