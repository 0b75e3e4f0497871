# Train one stitch layer per dataset x (source, target) x layer x stitch layer x method.
# lfm reads the cache only; ffm / tlt / ffm_tlt run the frozen target tail (gpu=1);
# ffm_tlt starts from the ffm checkpoint of the same pair, layer and stitch layer.


rule train:
    input:
        src_train=features("src", "train"),
        src_val=features("src", "val"),
        tgt_train=features("tgt", "train"),
        tgt_val=features("tgt", "val"),
        init=ffm_init_input,
    output:
        checkpoint="results/stitch/{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}/checkpoint.pt",
        metrics="results/stitch/{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}/train.json",
    log:
        "logs/train/{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{src}--{tgt}/layer{layer}/{stitch}/{method}.tsv"
    params:
        settings=train_settings_param,
        init=init_arg,
    conda:
        "../envs/stitchcache.yaml"
    group:
        train_group
    threads: 1
    resources:
        mem_mb=train_mem_mb,
        runtime=60,
        gpu=train_gpu,
    shell:
        "python -m stitchcache train --method {wildcards.method} --layer {wildcards.layer}"
        " --stitch {wildcards.stitch} --src-train {input.src_train:q} --src-val {input.src_val:q}"
        " --tgt-train {input.tgt_train:q} --tgt-val {input.tgt_val:q} {params.init}"
        " --settings {params.settings:q} --out {output.checkpoint:q} --metrics {output.metrics:q}"
        " > {log:q} 2>&1"
