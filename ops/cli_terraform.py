"""``meridian terraform ...``: keep terraform's variables in step with the topology.

``meridian terraform render [--topology PATH] [--out PATH]`` writes the production root's
``terraform.tfvars.json`` from the topology file (see ``regions/terraform.py``). The lead's CLI
calls :func:`register` on its sub-parser collection.
"""

from __future__ import annotations

import argparse
import sys

from regions.terraform import DEFAULT_TFVARS, write_tfvars
from regions.topology import TopologyError, load_topology


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``terraform`` command group to the CLI's sub-parsers."""
    tf = sub.add_parser("terraform", help="infrastructure as code (terraform/)")
    tf_sub = tf.add_subparsers(dest="terraform_command", required=True)
    render = tf_sub.add_parser(
        "render", help="write the production root's terraform.tfvars.json from the topology"
    )
    render.add_argument(
        "--topology", default=None, help="topology TOML (default: regions/topology.toml)"
    )
    render.add_argument(
        "--out", default=str(DEFAULT_TFVARS), help=f"output file (default: {DEFAULT_TFVARS})"
    )
    render.set_defaults(func=_render)


def _render(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.topology)
    except TopologyError as e:
        print(f"terraform render: {e}", file=sys.stderr)
        return 2
    path = write_tfvars(topology, args.out)
    print(f"wrote {path} ({len(topology.regions)} regions from {topology.source})")
    return 0
