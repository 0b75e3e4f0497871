# Collect every evaluation and base probe into one table (Parquet, CSV, Markdown) and the
# paper-shaped tables (paper_tables.md), then plot it.


rule table:
    input:
        evals=all_evals(),
        probes=all_probes(),
    output:
        parquet="results/table.parquet",
        csv=report("results/table.csv", caption="../report/table.rst", category="Tables"),
        md="results/table.md",
        paper=report("results/paper_tables.md", caption="../report/paper.rst", category="Tables"),
    log:
        "logs/table.log",
    params:
        out_dir=output_dir,
        settings=table_settings_param,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stitchcache table --evals {input.evals:q} --probes {input.probes:q}"
        " --settings {params.settings:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule plot:
    input:
        table="results/table.parquet",
    output:
        accuracy=report("results/plots/accuracy.png", caption="../report/accuracy.rst", category="Plots"),
        distances=report("results/plots/distances.png", caption="../report/distances.rst", category="Plots"),
    log:
        "logs/plot.log",
    params:
        out_dir=output_dir,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stitchcache plot --table {input.table:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule findings:
    input:
        table="results/table.parquet",
        # per-image predictions: the test split's noise (paired standard errors) in the verdicts
        predictions=all_predictions() + all_probe_predictions(),
    output:
        findings=report("results/findings.md", caption="../report/findings.rst", category="Findings"),
    log:
        "logs/findings.log",
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stitchcache findings --table {input.table:q} --predictions {input.predictions:q}"
        " --out {output.findings:q} > {log:q} 2>&1"
