"""``meridian ledger migrate|export|verify|held|post-held``: the ledger's operator and compliance
commands.

The DSN comes from ``--dsn`` or the environment variable ``MERIDIAN_PG_DSN``.

* ``migrate`` brings the schema up to date for the topology (idempotent).
* ``export --regions lon,nyc,sgp --from ISO --to ISO --format csv|jsonl --out DIR`` writes one
  consistent snapshot plus ``manifest.json``; progress goes to stderr.
* ``verify [--regions] [--manifest EXPORT]`` re-checks double entry, balances, every
  transfer against its trade's terms and every hash chain of the topology's regions (each
  must be in the ledger), and fails while a fill the writer held is not posted: exit 0 pass,
  1 fail. With an export's manifest it also checks every chain still runs through the
  manifest's heads: the only check a rewrite of the whole chain inside the database cannot
  pass (:data:`VERIFY_EPILOG`).
* ``held [--regions]`` lists the fills the writers hold and have not posted (exit 1 if any).
* ``post-held --region R`` posts them from ``held_fills`` with this build and topology, once
  the cause is mended; for fills the stream has deleted (EXECOUT max_age). While the stream
  still holds them, a writer whose build and topology can read them posts them itself within
  30 s. A fill whose currencies the topology given disagrees on with the ledger is not
  posted.

Exit codes: 0 ok, 1 verify found problems, 2 bad arguments or configuration, 3 database
unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

DSN_ENV = "MERIDIAN_PG_DSN"

VERIFY_EPILOG = """\
How compliance anchors a ledger: the hash chains prove rows were not edited, deleted or
inserted only relative to the chain heads stored in the same database; someone who can
write the database can rewrite a chain up to its tip (or cut its tail) and its head row
too, and verify alone still passes. So export regularly (meridian ledger export) and keep
each export's manifest.json OUTSIDE the database (WORM storage, a signed mail, the audit
file). verify --manifest then requires every region the manifest lists to be present and
its chain to still run through the manifest's head (that posting, with that hash), which
a rewrite cannot fake; with the export's postings file beside the manifest it also names
the first row rewritten. Trades posted after the export are covered by the next one.

Regions: the topology's (--topology), each must be in the ledger (a head row from migrate),
plus any other the ledger holds. A region with no postings is reported empty, not a
failure: only a manifest that saw postings there can prove they were deleted.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``ledger`` command group to the CLI's sub-parsers."""
    lg = sub.add_parser(
        "ledger", help="geo-partitioned ledger: migrate, export, verify, held, post-held"
    )
    lsub = lg.add_subparsers(dest="ledger_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dsn", default=None, help=f"database DSN (default: ${DSN_ENV})")
        p.add_argument("--topology", default=None, help="topology TOML (default: shipped)")

    m = lsub.add_parser("migrate", help="create/upgrade the ledger schema (idempotent)")
    common(m)
    m.add_argument(
        "--no-compliance-role",
        action="store_true",
        help="do not create/grant the read-only meridian_compliance role",
    )
    m.set_defaults(func=_migrate)

    e = lsub.add_parser("export", help="consistent cross-region export with a manifest")
    common(e)
    e.add_argument("--regions", default=None, help="comma-separated (default: all regions)")
    e.add_argument(
        "--from",
        dest="from_",
        default=None,
        help="trade time from, ISO 8601 (UTC if no offset), inclusive",
    )
    e.add_argument(
        "--to",
        default=None,
        help="trade time to, ISO 8601, exclusive (a ranged export's chains are cut: its "
        "manifest says so, and still anchors verify --manifest)",
    )
    e.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument(
        "--role", default=None, help="run the export as this role (e.g. meridian_compliance)"
    )
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_export)

    v = lsub.add_parser(
        "verify",
        help="re-check double entry, balances, transfers, hash chains (exit 1)",
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(v)
    v.add_argument(
        "--regions", default=None, help="comma-separated, of the topology (default: all)"
    )
    v.add_argument(
        "--manifest",
        default=None,
        help="an export's manifest.json (or its directory), kept outside the database: "
        "every chain must still run through its heads",
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_verify)

    h = lsub.add_parser("held", help="fills the writers hold and have not posted (exit 1 if any)")
    common(h)
    h.add_argument("--regions", default=None, help="comma-separated (default: all)")
    h.set_defaults(func=_held)

    ph = lsub.add_parser(
        "post-held",
        help="post the held fills of a region that this build and topology can read",
    )
    common(ph)
    ph.add_argument("--region", required=True)
    ph.set_defaults(func=_post_held)


def parse_time_ns(text: str) -> int:
    """ISO 8601 (naive = UTC) or integer nanoseconds -> UTC ns."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _dsn(args: argparse.Namespace) -> str | None:
    dsn: str | None = args.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        print(f"ledger: no database: pass --dsn or set {DSN_ENV}", file=sys.stderr)
    return dsn


def _regions(args: argparse.Namespace) -> tuple[str, ...] | None:
    if not args.regions:
        return None
    return tuple(r.strip() for r in args.regions.split(",") if r.strip())


def _migrate(args: argparse.Namespace) -> int:
    import sqlalchemy.exc

    from ledger.errors import LedgerConfigError
    from ledger.migrations import applied_versions, migrate
    from regions.topology import load_topology

    dsn = _dsn(args)
    if dsn is None:
        return 2
    topology = load_topology(args.topology)
    try:
        applied = migrate(dsn, topology, compliance_role=not args.no_compliance_role)
        versions = applied_versions(dsn)
    except sqlalchemy.exc.OperationalError as e:
        print(f"ledger migrate: database unreachable: {e.orig}", file=sys.stderr)
        return 3
    except LedgerConfigError as e:  # e.g. a topology whose units disagree with the ledger's
        print(f"ledger migrate: refused: {e}", file=sys.stderr)
        return 2
    print(
        f"ledger schema at version {max(versions, default=0)} "
        f"(applied now: {applied or 'none'}; regions {', '.join(topology.codes)})"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    import psycopg

    from ledger.errors import LedgerConfigError
    from ledger.export import MAX_NS, ExportRequest, export_ledger
    from regions.topology import load_topology

    dsn = _dsn(args)
    if dsn is None:
        return 2
    try:
        regions = _regions(args) or load_topology(args.topology).codes
        req = ExportRequest(
            regions=regions,
            out_dir=Path(args.out),
            fmt=args.format,
            from_ns=parse_time_ns(args.from_) if args.from_ else 0,
            to_ns=parse_time_ns(args.to) if args.to else MAX_NS,
            role=args.role,
        )
        manifest = export_ledger(dsn, req, progress=None if args.quiet else sys.stderr)
    except (LedgerConfigError, ValueError) as e:
        print(f"ledger export: {e}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as e:
        print(f"ledger export: database unreachable: {e}", file=sys.stderr)
        return 3
    p = manifest["postings"]
    print(
        f"exported {p['rows']} postings, {manifest['transfers']['rows']} transfers, "
        f"{manifest['balances']['rows']} balances from {', '.join(regions)} "
        f"(snapshot {manifest['snapshot']['time']}) to {args.out} "
        f"in {manifest['elapsed_s']} s"
    )
    if not manifest["chain_verifiable"]:
        print(f"  ranged: {manifest['chain_note']}")
    held = manifest["held_outstanding"]
    if held["count"] != 0:
        ids = ", ".join(str(h["trade_id"] or "?") for h in held.get("fills", [])[:10])
        print(f"  held fills outstanding (not in the books): {held['count']} {ids}".rstrip())
    print(f"  keep {Path(args.out) / 'manifest.json'} outside the database: verify --manifest")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import psycopg

    from ledger.errors import LedgerConfigError
    from ledger.verify import verify
    from regions.topology import TopologyError, load_topology

    dsn = _dsn(args)
    if dsn is None:
        return 2
    try:
        topology = load_topology(args.topology)
        report = verify(dsn, regions=_regions(args), topology=topology, manifest=args.manifest)
    except (LedgerConfigError, TopologyError, OSError) as e:
        print(f"ledger verify: {e}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as e:
        print(f"ledger verify: database unreachable: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        status = "PASS" if report.ok else "FAIL"
        print(
            f"ledger verify {status}: {report.postings_checked} postings, "
            f"{report.transfers_checked} transfers, {report.balances_checked} balances, "
            f"regions {', '.join(report.regions)}"
        )
        for region, (head_id, head_hash) in sorted(report.heads.items()):
            print(f"  chain {region}: head {head_id} {head_hash[:16]}")
        if report.empty_regions:
            print(
                f"  empty (no postings; only a manifest can tell whether there were): "
                f"{', '.join(report.empty_regions)}"
            )
        if report.manifest is not None:
            at = ", ".join(f"{r} at {i}" for r, (i, _) in sorted(report.anchored.items()))
            print(f"  anchored to {report.manifest}: {at or 'no chain heads'}")
        else:
            print("  not anchored (no --manifest): a rewrite of a whole chain would pass")
        for prob in report.problems:
            print(f"  {prob}")
        if report.truncated:
            print("  (more problems not shown)")
    return 0 if report.ok else 1


def _held(args: argparse.Namespace) -> int:
    import psycopg

    from ledger.db import libpq_dsn
    from ledger.held import outstanding
    from regions.topology import load_topology

    dsn = _dsn(args)
    if dsn is None:
        return 2
    regions = _regions(args) or load_topology(args.topology).codes

    def show() -> int:
        with psycopg.connect(libpq_dsn(dsn)) as conn:
            held = outstanding(conn, regions)
        print(f"{len(held)} fills held, not posted ({', '.join(regions)})")
        for h in held:
            print(f"  {h}")
        return 1 if held else 0

    return _on_db("ledger held", show)


def _post_held(args: argparse.Namespace) -> int:
    import asyncio

    import psycopg
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

    from ledger.db import is_retryable, libpq_dsn
    from ledger.errors import TransferConflict
    from ledger.held import post_held
    from regions.topology import load_topology

    dsn = _dsn(args)
    if dsn is None:
        return 2
    topology = load_topology(args.topology)
    if args.region not in topology.codes:
        print(f"ledger post-held: {args.region!r} is not a region of the topology", file=sys.stderr)
        return 2

    async def go() -> int:
        # the whole posting again on a serialization failure or a lost connection, as the
        # writer does (deterministic transfer ids: a retry never posts twice)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(5),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            reraise=True,
        ):
            with attempt:
                async with await psycopg.AsyncConnection.connect(libpq_dsn(dsn)) as conn:
                    try:
                        res = await post_held(conn, topology, args.region)
                    except TransferConflict as e:
                        print(f"ledger post-held: nothing posted: {e}", file=sys.stderr)
                        for t, why in e.conflicts:
                            print(f"  {t.id}: {why}", file=sys.stderr)
                        return 1
        new = res.batch.transfers_new if res.batch else 0
        print(
            f"posted {len(res.posted)} held fills of {args.region} ({new} new transfers, two "
            f"a fill; any other fill was posted already); {len(res.still_held)} still cannot "
            "be posted"
        )
        for h, why in res.still_held:
            print(f"  {h.region} EXECOUT seq {h.stream_seq} trade {h.trade_id or '?'}: {why}")
        return 1 if res.still_held else 0

    return _on_db("ledger post-held", lambda: asyncio.run(go()))


def _on_db(what: str, call: Callable[[], int]) -> int:
    """``call``'s exit code, or 3 when the database is unreachable and 2 when it refuses
    (with the likely remedy)."""
    import psycopg
    import psycopg.errors

    try:
        return call()
    except psycopg.OperationalError as e:
        print(f"{what}: database unreachable: {e}", file=sys.stderr)
        return 3
    except psycopg.Error as e:
        why = str(e)
        if isinstance(e, psycopg.errors.UndefinedTable):
            why += " (run `meridian ledger migrate`: held_fills is migration 2)"
        elif isinstance(e, psycopg.errors.InsufficientPrivilege):
            why += " (this role may not read or write held_fills)"
        print(f"{what}: {why}", file=sys.stderr)
        return 2
