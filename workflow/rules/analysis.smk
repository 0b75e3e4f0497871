# Analyses from the cache and the per-image predictions (docs/stages/analysis.md):
# Table 10 (stitched S->T vs its self-stitch controls, image by image) and the layer x layer
# linear-CKA atlas of every model pair, joined with the stitching results.


rule table10:
    input:
        predictions=all_predictions(),
    output:
        parquet="results/analysis/table10.parquet",
        md=report("results/analysis/table10.md", caption="../report/table10.rst", category="Analysis"),
        png=report("results/analysis/table10.png", caption="../report/table10.rst", category="Analysis"),
    log:
        "logs/analysis/table10.log",
    params:
        out_dir=output_dir,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stitchcache analyze table10 --predictions {input.predictions:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule cka:
    input:
        a=cka_record("a"),
        b=cka_record("b"),
    output:
        parquet="results/analysis/cka/{dataset}/{a}--{b}.parquet",
    log:
        "logs/analysis/cka/{dataset}/{a}--{b}.log",
    wildcard_constraints:
        a=NAME,
        b=NAME,
    params:
        variants=cka_variants_param,
        device=config["device"],
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpu_resource,
    shell:
        "python -m stitchcache analyze cka --a {input.a:q} --b {input.b:q} --variants {params.variants} --no-plot"
        " --device {params.device:q} --out {output.parquet:q} > {log:q} 2>&1"


# the heatmaps are drawn here (stitch points of the results table marked), so a changed grid
# redraws them without recomputing any CKA
rule cka_join:
    input:
        cka=all_cka(),
        table="results/table.parquet",
    output:
        parquet="results/analysis/cka_vs_stitch.parquet",
        spearman="results/analysis/cka_vs_stitch_spearman.parquet",
        md=report("results/analysis/cka_vs_stitch.md", caption="../report/cka_vs_stitch.rst", category="Analysis"),
        heatmaps=[report(p, caption="../report/cka.rst", category="Analysis") for p in all_cka_heatmaps()],
    log:
        "logs/analysis/cka_join.log",
    params:
        out_dir=output_dir,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stitchcache analyze cka-join --cka {input.cka:q} --table {input.table:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
