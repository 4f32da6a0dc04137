# register: CTPA -> NCT with antspyx (affine initialisation, then SyN); the image (linear) and the annotation
# (genericLabel) are warped into NCT space. QC for every patient is collected into one table.


rule register:
    input:
        nct=f"{RES}/nifti/{{patient}}/nct.nii.gz",
        ctpa=f"{RES}/nifti/{{patient}}/ctpa.nii.gz",
        mask=annotation_mask,
        truth=truth_mask,
    output:
        ctpa=f"{RES}/registered/{{patient}}/ctpa_in_nct.nii.gz",
        mask=f"{RES}/registered/{{patient}}/mask_in_nct.nii.gz",
        qc=f"{RES}/registered/{{patient}}/qc.json",
    log:
        f"{RES}/logs/register/{{patient}}.log",
    benchmark:
        f"{RES}/benchmarks/register/{{patient}}.tsv"
    conda:
        "../../envs/register.yaml"
    threads: config["resources"]["register_threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        out=output_dir("qc"),
        mask=mask_flag,
        truth=truth_flag,
        cfg=section("register"),
    shell:
        "cpmn register --patient {wildcards.patient} --nct {input.nct} --ctpa {input.ctpa}"
        " {params.mask} {params.truth} --out-dir {params.out} --threads {threads}"
        " --params {params.cfg:q} > {log} 2>&1"


rule registration_qc:
    input:
        registration_qc_files,
    output:
        report(
            f"{RES}/qc/registration.tsv",
            caption="../report/registration.rst",
            category="Quality control",
        ),
    log:
        f"{RES}/logs/registration_qc.log",
    benchmark:
        f"{RES}/benchmarks/registration_qc.tsv"
    conda:
        "../../envs/register.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "cpmn collect-qc --out {output} {input} > {log} 2>&1"
