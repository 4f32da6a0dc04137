# infer: sliding-window inference on NCT (CTPA for the ctpa variant): patient probability, mask and Grad-CAM.


rule infer:
    input:
        model=f"{RES}/models/{{variant}}/model.pt",
        splits=f"{RES}/splits.tsv",
        preprocessed=preprocessed_files,
        images=nct_images,
    output:
        tsv=f"{RES}/predictions/{{variant}}/{{split}}.tsv",
        masks=report(
            directory(f"{RES}/predictions/{{variant}}/{{split}}"),
            patterns=["{patient}_cam.png"],
            caption="../report/cam.rst",
            category="Grad-CAM",
            subcategory="{variant} ({split})",
            labels={
                "variant": "{variant}",
                "split": "{split}",
                "patient": "{patient}",
            },
        ),
    log:
        f"{RES}/logs/infer/{{variant}}_{{split}}.log",
    benchmark:
        f"{RES}/benchmarks/infer/{{variant}}_{{split}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=GPU,
        mem_mb=4000,
        runtime=30,
    params:
        pre=input_dir("preprocessed"),
        nifti=f"{RES}/nifti",
        refs=ref_template,
        cfg=infer_params(),
    shell:
        "cpmn infer --model {input.model} --splits {input.splits} --split {wildcards.split}"
        " --preprocessed-dir {params.pre} --nifti-dir {params.nifti} --ref-template {params.refs:q}"
        " --out {output.tsv} --threads {threads} --params {params.cfg:q} > {log} 2>&1"
