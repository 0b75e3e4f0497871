# One forward pass per dataset x model x split captures every requested layer's tokens into the
# content-keyed feature store under cache_root; the declared output is the store's small record.
# Models with fixed weights: the record lives in the cache root under a request key, so another
# experiment sharing the cache root schedules no extraction. Pretrained-here models: the record
# lives in results/features (docs/stages/extract.md, "Reuse across experiments").

EXTRACT_SHELL = (
    "python -m stitchcache extract --model-spec {params.model:q} --dataset-spec {params.dataset:q}"
    " --split {wildcards.split:q} --cache-root {params.cache_root:q} --settings {params.settings:q}"
    " --out {output.record:q} > {log:q} 2>&1"
)


rule extract:
    output:
        record=record_pattern(),
    log:
        "logs/extract/{dataset}/{model}/{split}-{request}.log",
    benchmark:
        "results/benchmarks/extract/{dataset}/{model}/{split}-{request}.tsv"
    wildcard_constraints:
        model=fixed_model_regex(),
        request="[0-9a-f]{16}",
    params:
        model=model_spec_param,
        dataset=extract_dataset_param,
        settings=extract_settings_param,
        cache_root=cache_root_of_record,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpu_resource,
    shell:
        EXTRACT_SHELL


rule extract_pretrained:
    input:
        checkpoint=pretrained_checkpoint,
    output:
        record="results/features/{dataset}/{model}/{split}.json",
    log:
        "logs/extract/{dataset}/{model}/{split}.log",
    benchmark:
        "results/benchmarks/extract/{dataset}/{model}/{split}.tsv"
    wildcard_constraints:
        model=pretrain_model_regex(),
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
        EXTRACT_SHELL
