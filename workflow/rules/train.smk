# train: one job per variant (a variant is a config entry: pathways and loss weights of Eq. 5).


rule train:
    input:
        splits=f"{RES}/splits.tsv",
        preprocessed=preprocessed_files,
        patches=patch_files,
    output:
        model=f"{RES}/models/{{variant}}/model.pt",
        log_tsv=report(
            f"{RES}/models/{{variant}}/train_log.tsv",
            caption="../report/train_log.rst",
            category="Training",
            subcategory="{variant}",
        ),
    log:
        f"{RES}/logs/train/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{variant}}.tsv"
    priority: train_priority
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=GPU,
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=config["resources"]["train_runtime"],
    params:
        out=output_dir("model"),
        pre=input_dir("preprocessed"),
        patches=input_dir("patches"),
        cfg=train_params(),
        launcher=train_launcher,
    shell:
        "{params.launcher} train --variant {wildcards.variant} --splits {input.splits} --preprocessed-dir {params.pre}"
        " --patches-dir {params.patches} --out-dir {params.out} --threads {threads}"
        " --params {params.cfg:q} > {log} 2>&1"
