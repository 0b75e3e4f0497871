# Base-model linear probes and the evaluation of every trained stitch (stitched features are
# exported into the cache, probed, and the distances d_l / d_L measured on the val split).


rule probe:
    input:
        train=features("model", "train"),
        val=features("model", "val"),
    output:
        probe="results/probes/{dataset}/{model}.json",
    log:
        "logs/probe/{dataset}/{model}.log",
    params:
        settings=probe_settings_param,
    conda:
        "../envs/stitchcache.yaml"
    group:
        SMALL_GROUP
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stitchcache probe --train {input.train:q} --val {input.val:q}"
        " --settings {params.settings:q} --out {output.probe:q} > {log:q} 2>&1"


rule evaluate:
    input:
        checkpoint=stitch_output("checkpoint.pt"),
        src_train=features("src", "train"),
        src_val=features("src", "val"),
        tgt_train=features("tgt", "train"),
        tgt_val=features("tgt", "val"),
    output:
        evaluation=stitch_output("eval.json"),
    log:
        stitch_log("evaluate"),
    benchmark:
        stitch_benchmark("evaluate")
    params:
        settings=evaluate_settings_param,
        cache_root=cache_root(),
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpu_resource,
    shell:
        "python -m stitchcache evaluate --checkpoint {input.checkpoint:q}"
        " --src-train {input.src_train:q} --src-val {input.src_val:q}"
        " --tgt-train {input.tgt_train:q} --tgt-val {input.tgt_val:q}"
        " --cache-root {params.cache_root:q} --settings {params.settings:q}"
        " --out {output.evaluation:q} > {log:q} 2>&1"
