# dicom_to_nifti: dcm2niix, picking the NCT and CTPA series (qc.json says which and why).


rule convert:
    input:
        sheet=SCREENED,
        dicom=dicom_dirs,
    output:
        nct=f"{RES}/nifti/{{patient}}/nct.nii.gz",
        ctpa=f"{RES}/nifti/{{patient}}/ctpa.nii.gz",
        qc=f"{RES}/nifti/{{patient}}/qc.json",
    log:
        f"{RES}/logs/convert/{{patient}}.log",
    benchmark:
        f"{RES}/benchmarks/convert/{{patient}}.tsv"
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        out=output_dir("qc"),
        cfg=section("convert"),
    shell:
        "cpmn convert {input.dicom} {params.out} --patient {wildcards.patient}"
        " --params {params.cfg:q} > {log} 2>&1"
