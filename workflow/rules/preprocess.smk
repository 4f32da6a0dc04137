# preprocess (common spacing, HU window, body crop; one .npz per patient) and the balanced patch bank.


rule preprocess:
    input:
        sheet=SCREENED,
        nct=f"{RES}/nifti/{{patient}}/nct.nii.gz",
        ctpa=f"{RES}/registered/{{patient}}/ctpa_in_nct.nii.gz",
        mask=f"{RES}/registered/{{patient}}/mask_in_nct.nii.gz",
        truth=truth_mask,
    output:
        f"{RES}/preprocessed/{{patient}}.npz",
    log:
        f"{RES}/logs/preprocess/{{patient}}.log",
    benchmark:
        f"{RES}/benchmarks/preprocess/{{patient}}.tsv"
    conda:
        "../../envs/register.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        label=patient_label,
        truth=truth_flag,
        cfg=section("preprocess"),
    shell:
        "cpmn preprocess --patient {wildcards.patient} --label {params.label} --nct {input.nct}"
        " --ctpa {input.ctpa} --mask {input.mask} {params.truth} --out {output}"
        " --params {params.cfg:q} > {log} 2>&1"


rule patches:
    input:
        f"{RES}/preprocessed/{{patient}}.npz",
    output:
        f"{RES}/patches/{{patient}}.npz",
    log:
        f"{RES}/logs/patches/{{patient}}.log",
    benchmark:
        f"{RES}/benchmarks/patches/{{patient}}.tsv"
    conda:
        "../../envs/register.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=section("patches"),
    shell:
        "cpmn patches --preprocessed {input} --out {output} --params {params.cfg:q} > {log} 2>&1"
