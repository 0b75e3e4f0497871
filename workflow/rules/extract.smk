# One forward pass per dataset x model x split captures every requested layer's tokens into the
# content-keyed feature store under cache_root; the declared output is the small record JSON.


rule extract:
    input:
        checkpoint=checkpoint_input,
    output:
        record="results/features/{dataset}/{model}/{split}.json",
    log:
        "logs/extract/{dataset}/{model}/{split}.log",
    benchmark:
        "results/benchmarks/extract/{dataset}/{model}/{split}.tsv"
    params:
        model=model_spec_param,
        dataset=extract_dataset_param,
        settings=extract_settings_param,
        cache_root=cache_root(),
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpu_resource,
    shell:
        "python -m stitchcache extract --model-spec {params.model:q} --dataset-spec {params.dataset:q}"
        " --split {wildcards.split:q} --cache-root {params.cache_root:q} --settings {params.settings:q}"
        " --out {output.record:q} > {log:q} 2>&1"
