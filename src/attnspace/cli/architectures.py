"""``attnspace architectures``: every causal-LM type of the installed transformers, verified or refused.

Each type's tiny random model is built offline from its config class and its sites are
found and proven (:mod:`attnspace.architectures`); the table says which types attnspace can
measure, the form of each verified block, and why each other type is refused.
"""

from __future__ import annotations

from collections import Counter


def cmd_architectures(a):
    import csv
    import logging
    import os
    import sys
    import warnings

    from attnspace.architectures import REASONS, causal_lm_types, check_type

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no kernel or file fetched while building tiny models
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    for model_type in a.types or causal_lm_types():
        row = check_type(model_type)
        rows.append(row)
        print(f"{row.model_type:28s} {row.status:9s} {row.form or REASONS[row.reason]}"
              + (f": {row.detail}" if row.detail and a.detail else ""), flush=True)
    counts = Counter(r.status for r in rows)
    print(f"\n{counts['verified']} verified, {counts['refused']} refused, {len(rows)} model types")
    for reason, n in Counter(r.reason for r in rows if r.status == "refused").most_common():
        print(f"  {n:3d} refused: {REASONS[reason]}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model_type", "status", "reason", "form", "detail"])
            writer.writerows([r.model_type, r.status, r.reason, r.form, r.detail] for r in rows)
    sys.stdout.flush()


def add_commands(sub) -> None:
    s = sub.add_parser("architectures", help="verify the sites of every causal-LM type of the installed transformers")
    s.add_argument("types", nargs="*", help="model types to check (default: every type of the causal-LM mapping)")
    s.add_argument("--csv", help="also write the table here (model_type, status, reason, form, detail)")
    s.add_argument("--detail", action="store_true", help="print each refusal's own message")
    s.set_defaults(func=cmd_architectures)
