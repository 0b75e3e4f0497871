# Train the small demo encoders that have a `pretrain:` entry; the weights become the model's
# checkpoint for every later stage.


rule pretrain:
    output:
        model="results/models/{model}.pt",
    log:
        "logs/pretrain/{model}.log",
    benchmark:
        "results/benchmarks/pretrain/{model}.tsv"
    wildcard_constraints:
        model=pretrain_model_regex(),
    params:
        model=pretrain_model_spec_param,
        dataset=pretrain_dataset_param,
        settings=pretrain_settings_param,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpu_resource,
    shell:
        "python -m stitchcache pretrain --model-spec {params.model:q} --dataset-spec {params.dataset:q}"
        " --settings {params.settings:q} --out {output.model:q} > {log:q} 2>&1"
