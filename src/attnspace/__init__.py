"""attnspace: activation geometry and sparse dictionaries for attention outputs.

Reproduces *Attention Layers Add Into Low-Dimensional Residual Subspaces*
(Wang et al., OpenMOSS 2025). The library knows nothing of Snakemake; the
workflow in ``Snakefile`` and ``rules/`` calls the ``attnspace`` CLI.
"""

__version__ = "0.1.0"

SITES = ("attn_out", "mlp_out", "resid_post", "attn_z", "attn_in")
"""Activation sites, in the order a layer computes them. See ``attnspace.sites``."""
