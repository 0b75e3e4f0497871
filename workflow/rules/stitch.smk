# Train one stitch layer per dataset x (source, target) x layer x stitch layer x method x seed.
# lfm reads the cache only; ffm / tlt / ffm_tlt run the frozen target tail (gpu=1);
# ffm_tlt starts from the ffm checkpoint of the same pair, layer, stitch layer and seed.
# Paths come from stitch_output / stitch_log / stitch_benchmark (common.smk, stitchcache/grid.py).


rule train:
    input:
        src_train=features("src", "train"),
        src_val=features("src", "val"),
        tgt_train=features("tgt", "train"),
        tgt_val=features("tgt", "val"),
        init=ffm_init_input,
    output:
        checkpoint=stitch_output("checkpoint.pt"),
        metrics=stitch_output("train.json"),
    log:
        stitch_log("train"),
    benchmark:
        stitch_benchmark("train")
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
