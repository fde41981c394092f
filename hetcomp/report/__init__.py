"""Reports: the long table of every run (``aggregate``), the tables (``tables``) and figures (``figures``).

``hetcomp aggregate`` writes ``long.csv`` (one row per run, split, metric and K) plus an extras
folder (training histories, dataset statistics, inference cost, discrepancies); ``hetcomp report``
builds every table and figure from those files alone.
"""

#: Display names of the registered teachers and methods (unknown names are shown as they are).
DISPLAY_NAMES = {
    "wokd": "w/o KD", "hetcomp": "HetComp", "rrd": "RRD", "dcd": "DCD", "cldrd": "CL-DRD",
    "mtd": "MTD", "rd": "RD", "cd": "CD",
    "mf": "MF", "cml": "CML", "neumf": "NeuMF", "lightgcn": "LightGCN", "vae": "VAE", "iae": "I-AE",
    "ensemble": "Ensemble",
}

#: HetComp's ablations (``hetcomp.distill.hetcomp.ABLATIONS``): name -> what they remove. They
#: get their own table (ablation.md) and stay out of the comparisons with the baselines.
ABLATION_LABELS = {
    "hetcomp_nodkc": "w/o DKC", "hetcomp_phase1": "phase-1 loss only", "hetcomp_phase2": "phase-2 loss only",
    "hetcomp_nosep": "w/o observed/unobserved separation",
}
DISPLAY_NAMES.update({name: f"HetComp {label}" for name, label in ABLATION_LABELS.items()})

METRIC_NAMES = {"recall": "Recall", "ndcg": "NDCG"}


def display(name) -> str:
    return DISPLAY_NAMES.get(str(name), str(name))
