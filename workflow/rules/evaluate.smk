# evaluate: Table 1, Table 2, Fig. 2 and every p-value and CI, from the prediction files alone.


rule evaluate:
    input:
        predictions=prediction_files,
        readers=readers_file(),
    output:
        table1=report(
            f"{RES}/tables/table1_ablation.tsv",
            caption="../report/table1.rst",
            category="Tables",
        ),
        table2=report(
            f"{RES}/tables/table2_comparison.tsv",
            caption="../report/table2.rst",
            category="Tables",
        ),
        scores=report(
            f"{RES}/tables/score_comparison.tsv",
            caption="../report/score_comparison.rst",
            category="Tables",
        ),
        roc=report(
            f"{RES}/figures/fig2a_roc.png",
            caption="../report/fig2a.rst",
            category="Figures",
        ),
        case=report(
            f"{RES}/figures/fig2b_case.png",
            caption="../report/fig2b.rst",
            category="Figures",
        ),
        stats=f"{RES}/stats.json",
    log:
        f"{RES}/logs/evaluate.log",
    benchmark:
        f"{RES}/benchmarks/evaluate.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        predictions=expand(
            f"{{variant}}={RES}/predictions/{{variant}}", variant=VARIANTS
        ),
        readers=readers_flag,
        tables=output_dir("table1"),
        figures=output_dir("roc"),
        cfg=section("evaluate"),
    shell:
        "cpmn evaluate --predictions {params.predictions} {params.readers} --out-tables {params.tables}"
        " --out-figures {params.figures} --stats {output.stats} --params {params.cfg:q} > {log} 2>&1"


rule ceiling:
    input:
        splits=f"{RES}/splits.tsv",
        preprocessed=preprocessed_files,
        lumens=truth_lumens,
    output:
        table=report(
            f"{RES}/tables/ceiling.tsv",
            caption="../report/ceiling.rst",
            category="Tables",
        ),
        scores=f"{RES}/tables/ceiling.scores.tsv",
    log:
        f"{RES}/logs/ceiling.log",
    benchmark:
        f"{RES}/benchmarks/ceiling.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        pre=input_dir("preprocessed"),
        truth=f"{SYNTHETIC_DIR}/truth",
        cfg=section("ceiling"),
    shell:
        "cpmn ceiling --splits {input.splits} --preprocessed-dir {params.pre} --truth-dir {params.truth}"
        " --out {output.table} --params {params.cfg:q} > {log} 2>&1"


rule training_curves:
    input:
        logs=expand(f"{RES}/models/{{variant}}/train_log.tsv", variant=VARIANTS),
    output:
        report(
            f"{RES}/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
        ),
    log:
        f"{RES}/logs/training_curves.log",
    benchmark:
        f"{RES}/benchmarks/training_curves.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        logs=expand(
            f"{{variant}}={RES}/models/{{variant}}/train_log.tsv", variant=VARIANTS
        ),
    shell:
        "cpmn curves --logs {params.logs} --out {output} > {log} 2>&1"
