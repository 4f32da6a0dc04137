# card: a self-describing model folder (weights + card.json) that `cpmn predict` reads on its own.


rule model_card:
    input:
        model=f"{RES}/models/{{variant}}/model.pt",
        stats=f"{RES}/stats.json",
        splits=f"{RES}/splits.tsv",
    output:
        f"{RES}/models/{{variant}}/card.json",
    log:
        f"{RES}/logs/card/{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/card/{{variant}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        out=input_dir("model"),
        cfg=card_params(),
    shell:
        "cpmn card --model-dir {params.out} --stats {input.stats} --splits {input.splits}"
        " --params {params.cfg:q} > {log} 2>&1"
