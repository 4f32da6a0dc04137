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
    params:
        out=subpath(output.model, parent=True),
        pre=f"{RES}/preprocessed",
        patches=f"{RES}/patches",
        cfg=train_params(),
        device=DEVICE,
    log:
        f"{RES}/logs/train/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{variant}}.tsv"
    threads: 2
    resources:
        gpu=GPU,
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=config["resources"]["train_runtime"],
    shell:
        "cpmn train --variant {wildcards.variant} --splits {input.splits} --preprocessed-dir {params.pre}"
        " --patches-dir {params.patches} --out-dir {params.out} --device {params.device}"
        " --params {params.cfg:q} > {log} 2>&1"
