"""The ``attnspace`` command line: one thin subcommand per pipeline step.

Each Snakemake rule is one of these commands and each command wraps one library
function, so everything the workflow does can be run by hand. The subcommands are
grouped by stage: :mod:`~attnspace.cli.acquire` (models, tokens, the cache),
:mod:`~attnspace.cli.analysis` (spectra, loss recovered, W^O),
:mod:`~attnspace.cli.dictionaries` (SAEs, dead features, Lorsa) and
:mod:`~attnspace.cli.outputs` (figures, claims, gallery); :mod:`~attnspace.cli.architectures`
lists the model types whose sites are verified.
"""

from __future__ import annotations

import argparse
import logging
import sys

from attnspace.cli import acquire, analysis, architectures, dictionaries, outputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnspace", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for group in (acquire, analysis, dictionaries, outputs, architectures):
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors end as one line ``error: ... Fix: ...`` (``--debug``: the traceback)."""
    from attnspace.errors import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
