"""Export one trained SAE to SAELens and llamascopium and compare, on held-out tokens, each library's own
forward pass with this pipeline's; then judge each library's saved folder with the dead-feature evaluation
and compare its dead count with the library's own forward pass. Run in the interop venv::

    .venv-interop/bin/python bench/interop_agreement.py SAE_DIR HELDOUT_STORE --site attn_out --tokens 1000

Prints one JSON record: per library, firing-set mismatches (token x feature entries), the largest difference
of activations and of reconstructions relative to the largest value, and the two dead counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from llamascopium.models.sparse_dictionary import SparseDictionary
    from sae_lens import SAE

    from attnspace.dead_features import evaluate_dead_features
    from attnspace.llamascope import export_sae
    from attnspace.llamascope import load_llamascope
    from attnspace.sae.io import load_sae
    from attnspace.sae.model import reconstruct
    from attnspace.store import open_store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sae_dir")
    ap.add_argument("heldout", help="held-out store (.zarr or manifest)")
    ap.add_argument("--site", default="attn_out")
    ap.add_argument("--tokens", type=int, default=1000)
    a = ap.parse_args()

    store = open_store(Path(a.heldout))
    rows = []
    start = 0
    while sum(r.shape[0] for r in rows) < a.tokens and start < store.n_rows:
        rows.append(torch.from_numpy(store.rows(a.site, start, min(start + 4096, store.n_rows))))
        start += 4096
    x = torch.cat(rows)[: a.tokens]  # kept (non-BOS/EOS) rows, as the dead-feature evaluation reads them
    sae = load_sae(Path(a.sae_dir))
    with torch.no_grad():
        enc = sae.encode(x * sae.norm_factor)
        ref_acts = torch.zeros(x.shape[0], sae.d_sae).scatter_(1, enc.indices, enc.values)
        ref_recon = reconstruct(sae, x)

    def compare(acts, recon) -> dict:
        return dict(support_mismatch=int(((acts > 0) != (ref_acts > 0)).sum()),
                    acts_max_rel_diff=float((acts - ref_acts).abs().max() / ref_acts.abs().max()),
                    recon_max_rel_diff=float((recon - ref_recon).abs().max() / ref_recon.abs().max()),
                    dead_library=int(((acts > 0).sum(0) == 0).sum()))

    out = {"sae": a.sae_dir, "tokens": int(x.shape[0]), "d_sae": sae.d_sae, "k": sae.k,
           "dead_pipeline_model": int(((ref_acts > 0).sum(0) == 0).sum())}
    with tempfile.TemporaryDirectory() as tmp:
        export_sae(a.sae_dir, "saelens", Path(tmp) / "saelens")
        sl = SAE.load_from_disk(Path(tmp) / "saelens")
        with torch.no_grad():
            acts = sl.encode(x)
            out["saelens"] = compare(acts, sl.decode(acts))
        export_sae(a.sae_dir, "llamascopium", Path(tmp) / "llamascopium")
        ls = SparseDictionary.from_pretrained(str(Path(tmp) / "llamascopium"))
        hook = ls.cfg.hook_point_in
        with torch.no_grad():
            batch, scale = ls.normalize_activations({hook: x}, return_scale_factor=True)
            acts = ls.encode(batch[hook])
            out["llamascopium"] = compare(acts, ls.decode(acts) / scale[hook])
        for lib in ("saelens", "llamascopium"):  # the library's folder judged by the dead-feature evaluation
            record = evaluate_dead_features(load_llamascope(Path(tmp) / lib, d_model=x.shape[1]), store, a.site,
                                            n_tokens=a.tokens)
            out[lib]["dead_attnspace_dead_features"] = record["dead"]
            out[lib]["dead_window_tokens"] = record["n_tokens"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
