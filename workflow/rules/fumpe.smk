# fumpe: the paper's FUMPE experiment, a 2D segmentation of CTPA slices (config fumpe, docs/fumpe.md). It
# runs when fumpe.run is true, on fumpe.root or, when that is null, on a synthetic FUMPE-shaped set.


rule fumpe_synthetic:
    output:
        directory(f"{RES}/fumpe/data"),
    log:
        f"{RES}/logs/fumpe_synthetic.log",
    benchmark:
        f"{RES}/benchmarks/fumpe_synthetic.tsv"
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        cfg=fumpe_synthetic_params(),
    shell:
        "cpmn synthetic --layout fumpe --out {output} --quiet --params {params.cfg:q} > {log} 2>&1"


rule fumpe_train:
    input:
        FUMPE_ROOT,
    output:
        model=f"{RES}/fumpe/model/model.pt",
        log_tsv=f"{RES}/fumpe/model/train_log.tsv",
    log:
        f"{RES}/logs/fumpe_train.log",
    benchmark:
        f"{RES}/benchmarks/fumpe_train.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=GPU,
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=config["resources"]["train_runtime"],
    params:
        out=output_dir("model"),
        cfg=section("fumpe"),
    shell:
        "cpmn fumpe train --root {input} --out {params.out} --threads {threads}"
        " --params {params.cfg:q} > {log} 2>&1"


rule fumpe_evaluate:
    input:
        root=FUMPE_ROOT,
        model=f"{RES}/fumpe/model/model.pt",
    output:
        report(
            f"{RES}/tables/fumpe_dice.tsv",
            caption="../report/fumpe.rst",
            category="Tables",
        ),
    log:
        f"{RES}/logs/fumpe_evaluate.log",
    benchmark:
        f"{RES}/benchmarks/fumpe_evaluate.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        bootstrap=config["evaluate"]["bootstrap"],
    shell:
        "cpmn fumpe evaluate --root {input.root} --model {input.model} --out {output}"
        " --bootstrap {params.bootstrap} --threads {threads} > {log} 2>&1"
