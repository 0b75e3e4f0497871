# Base-model linear probes and the evaluation of every trained stitch (stitched features are
# exported into the cache, probed, and the distances d_l / d_L measured). Selection uses val; every
# reported number uses the dataset's test split when it has one (test_features / test_arg), else val.
# Both write per-image predictions (Parquet) beside their JSON.


rule probe:
    input:
        train=features("model", "train"),
        val=features("model", "val"),
        test=test_features("model"),
    output:
        probe="results/probes/{dataset}/{model}.json",
        predictions="results/probes/{dataset}/{model}.predictions.parquet",
    log:
        "logs/probe/{dataset}/{model}.log",
    params:
        settings=probe_settings_param,
        test=test_arg("test", "test"),
    conda:
        "../envs/stitchcache.yaml"
    group:
        SMALL_GROUP
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stitchcache probe --train {input.train:q} --val {input.val:q} {params.test}"
        " --settings {params.settings:q} --out {output.probe:q} --predictions {output.predictions:q}"
        " > {log:q} 2>&1"


rule evaluate:
    input:
        checkpoint=stitch_output("checkpoint.pt"),
        src_train=features("src", "train"),
        src_val=features("src", "val"),
        tgt_train=features("tgt", "train"),
        tgt_val=features("tgt", "val"),
        src_test=test_features("src"),
        tgt_test=test_features("tgt"),
    output:
        evaluation=stitch_output("eval.json"),
        predictions=stitch_output("predictions.parquet"),
    log:
        stitch_log("evaluate"),
    benchmark:
        stitch_benchmark("evaluate")
    params:
        settings=evaluate_settings_param,
        cache_root=cache_root(),
        test=evaluate_test_args,
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
        " --tgt-train {input.tgt_train:q} --tgt-val {input.tgt_val:q} {params.test}"
        " --cache-root {params.cache_root:q} --settings {params.settings:q}"
        " --out {output.evaluation:q} --predictions {output.predictions:q} > {log:q} 2>&1"
