# The cohort: the synthetic phantom (embedded default), screening of every row, and the temporal split.


rule synthetic:
    output:
        **montage_output(),
        sheet=f"{SYNTHETIC_DIR}/cohort.tsv",
        readers=f"{SYNTHETIC_DIR}/readers.tsv",
    log:
        f"{RES}/logs/synthetic.log",
    benchmark:
        f"{RES}/benchmarks/synthetic.tsv"
    conda:
        "../../envs/dicom.yaml"
    threads: 2
    resources:
        mem_mb=synthetic_mem_mb,
        runtime=30,
    params:
        out=output_dir("sheet"),
        cfg=section("synthetic"),
    shell:
        "cpmn synthetic --out {params.out} --jobs {threads} --params {params.cfg:q} > {log} 2>&1"


checkpoint screen_cohort:
    input:
        sheet=cohort_sheet(),
        readers=readers_file(),
    output:
        included=INCLUDED_SHEET,
        excluded=report(
            f"{RES}/qc/excluded.tsv",
            caption="../report/excluded.rst",
            category="Quality control",
        ),
        overlays=directory(f"{RES}/qc/mask_overlays"),
    log:
        f"{RES}/logs/screen_cohort.log",
    benchmark:
        f"{RES}/benchmarks/screen_cohort.tsv"
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        cfg=section("convert"),
        exclude=exclude_flag(),
        readers=readers_flag,
    shell:
        "cpmn screen --sheet {input.sheet} --included {output.included} --excluded {output.excluded}"
        " --overlays {output.overlays} {params.exclude} {params.readers} --params {params.cfg:q} > {log} 2>&1"


rule split:
    input:
        sheet=INCLUDED_SHEET,
    output:
        f"{RES}/splits.tsv",
    log:
        f"{RES}/logs/split.log",
    benchmark:
        f"{RES}/benchmarks/split.tsv"
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=section("split"),
    shell:
        "cpmn split --sheet {input.sheet} --out {output} --params {params.cfg:q} > {log} 2>&1"
