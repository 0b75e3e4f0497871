# VFM Stitch Trees (docs/stages/tree.md): evaluation from the cache (single + Full once per tree and
# dataset, VST-k per split point), the tree report (Table-12-shaped gains, knob plot), measured cost,
# vision-tower exports and the budget plan. Every stitch comes from the stitch stage (stitch_path).


wildcard_constraints:
    tree="[A-Za-z0-9_]+",


rule tree_base:
    input:
        trunk_train=tree_trunk_record("train"),
        trunk_val=tree_trunk_record("val"),
        branch_train=tree_branch_records("train"),
        branch_val=tree_branch_records("val"),
        trunk_test=tree_trunk_record("test"),
        branch_test=tree_branch_records("test"),
    output:
        evaluation="results/tree/{tree}/{dataset}/base.json",
    log:
        "logs/tree/{tree}/{dataset}/base.log",
    params:
        settings=tree_settings_param,
        branches=tree_branches_arg,
        test=tree_test_args,
    conda:
        "../envs/stitchcache.yaml"
    group:
        SMALL_GROUP
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stitchcache tree evaluate --tree {wildcards.tree} --trunk-train {input.trunk_train:q}"
        " --trunk-val {input.trunk_val:q} --branches {params.branches} --branch-train {input.branch_train:q}"
        " --branch-val {input.branch_val:q} {params.test} --settings {params.settings:q} --out {output.evaluation:q} > {log:q} 2>&1"


rule tree_vst:
    input:
        checkpoints=tree_stitches,
        trunk_train=tree_trunk_record("train"),
        trunk_val=tree_trunk_record("val"),
        branch_train=tree_branch_records("train"),
        branch_val=tree_branch_records("val"),
        trunk_test=tree_trunk_record("test"),
        branch_test=tree_branch_records("test"),
    output:
        evaluation="results/tree/{tree}/{dataset}/vst{layer}.json",
    log:
        "logs/tree/{tree}/{dataset}/vst{layer}.log",
    params:
        settings=tree_settings_param,
        branches=tree_branches_arg,
        test=tree_test_args,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpu_resource,
    shell:
        "python -m stitchcache tree evaluate --tree {wildcards.tree} --trunk-train {input.trunk_train:q}"
        " --trunk-val {input.trunk_val:q} --branches {params.branches} --branch-train {input.branch_train:q}"
        " --branch-val {input.branch_val:q} {params.test} --checkpoints {input.checkpoints:q} --settings {params.settings:q}"
        " --out {output.evaluation:q} > {log:q} 2>&1"


rule tree_report:
    input:
        evals=tree_evals_of,
    output:
        md=report("results/tree/{tree}/tree_table.md", caption="../report/tree_table.rst", category="VFM Stitch Tree"),
        csv="results/tree/{tree}/tree_table.csv",
        parquet="results/tree/{tree}/tree_table.parquet",
        gains="results/tree/{tree}/tree_gains.json",
        knob=report("results/tree/{tree}/tree_knob.png", caption="../report/tree_knob.rst", category="VFM Stitch Tree"),
    log:
        "logs/tree/{tree}/report.log",
    params:
        out_dir=output_dir,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stitchcache tree report --evals {input.evals:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule tree_cost:
    input:
        checkpoints=tree_cost_stitches,
    output:
        json="results/tree/{tree}/cost.json",
        md=report("results/tree/{tree}/cost.md", caption="../report/tree_cost.rst", category="VFM Stitch Tree"),
    log:
        "logs/tree/{tree}/cost.log",
    params:
        options=tree_options_arg,
        device=config["device"],
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpu_resource,
    shell:
        "python -m stitchcache tree cost --checkpoints {input.checkpoints:q} {params.options} --device {params.device}"
        " --out {output.json:q} --markdown {output.md:q} > {log:q} 2>&1"


rule tree_export:
    input:
        checkpoints=tree_stitches,
    output:
        tower="results/tree/{tree}/{dataset}/vst{layer}.pt",
    log:
        "logs/tree/{tree}/{dataset}/export{layer}.log",
    params:
        options=tree_options_arg,
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "python -m stitchcache tree export --checkpoints {input.checkpoints:q} {params.options}"
        " --out {output.tower:q} > {log:q} 2>&1"


rule tree_plan:
    input:
        evals=all_tree_evals(),
    output:
        md=report("results/tree/plan.md", caption="../report/tree_plan.rst", category="VFM Stitch Tree"),
        json="results/tree/plan.json",
    log:
        "logs/tree/plan.log",
    params:
        budget=config["tree"]["budget"],
    conda:
        "../envs/stitchcache.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stitchcache tree plan --evals {input.evals:q} --budget {params.budget:q} --out {output.md:q} > {log:q} 2>&1"
