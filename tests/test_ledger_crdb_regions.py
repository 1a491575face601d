"""The CockroachDB migration's emitted SQL: region names, survival goal, reruns, new regions.

CockroachDB cannot run here; what it is sent can be checked. Region names must be the ones the
production cluster has (terraform/modules/ledger/main.tf builds them), a demo or self-hosted
cluster maps them its own way, a rerun must change nothing, the survival goal is terraform's,
and a region added to the topology gets a database region and a crdb_region that maps it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import hcl2
import pytest

from ledger import schema
from ledger.errors import LedgerConfigError
from ledger.migrations import (
    MIGRATIONS,
    CockroachState,
    Target,
    cockroach_locality_ddl,
    cockroach_region_columns_ddl,
)
from ledger.schema import TRANSACTIONAL_TABLES, crdb_region_case, schema_ddl
from regions.topology import Topology, load_topology

REPO = Path(__file__).resolve().parent.parent
LEDGER_TF = REPO / "terraform" / "modules" / "ledger" / "main.tf"
PRODUCTION_TF = REPO / "terraform" / "envs" / "production" / "main.tf"
TOPO = load_topology()


def _target(topology: Topology = TOPO) -> Target:
    return Target(dialect="cockroachdb", topology=topology, database="ledger")


def _terraform_names() -> dict[str, str]:
    """Region code -> the name terraform gives the database region (locals.crdb_region)."""
    with LEDGER_TF.open() as f:
        expr = hcl2.load(f)["locals"][0]["crdb_region"]
    # ${{for code, cloud in var.regions : code => "gcp-${cloud}"}}
    m = re.fullmatch(r'\$\{\{for (\w+), (\w+) in var\.regions : \1 => "([^"]*)"\}\}', expr.strip())
    assert m, f"locals.crdb_region changed shape: {expr!r}; update this test and the schema"
    value_var, fmt = m.group(2), m.group(3)
    # the module's var.regions is code => Region.cloud_region (envs/production wires it so)
    with PRODUCTION_TF.open() as f:
        blocks = {k.strip('"'): v for b in hcl2.load(f)["module"] for k, v in b.items()}
    ledger_module = blocks["ledger"]
    assert ledger_module["regions"] == "${{for code, r in var.regions : code => r.cloud_region}}"
    return {r.code: fmt.replace("${" + value_var + "}", r.cloud_region) for r in TOPO.regions}


# ---- finding: region names the production cluster has ---------------------------------------


def test_migration_uses_the_region_names_terraform_gives_the_cluster() -> None:
    tf = _terraform_names()
    assert tf["lon"] == "gcp-europe-west2"  # sanity: CockroachDB Cloud's GCP naming
    assert schema.crdb_region_names(TOPO) == tf
    locality = cockroach_locality_ddl(_target(), CockroachState(primary_region=None))
    assert locality[0] == f'ALTER DATABASE "ledger" SET PRIMARY REGION "{tf[TOPO.hub]}"'
    assert sorted(locality[1:]) == sorted(
        f'ALTER DATABASE "ledger" ADD REGION IF NOT EXISTS "{tf[c]}"'
        for c in TOPO.codes
        if c != TOPO.hub
    )
    for m in MIGRATIONS:
        for sql in m.statements(_target()):
            if "crdb_region crdb_internal_region" in sql:
                for code, name in tf.items():
                    assert f"WHEN '{code}' THEN '{name}'" in sql
                # no bare GCP region name (what SHOW REGIONS FROM CLUSTER does not list)
                for r in TOPO.regions:
                    assert f"THEN '{r.cloud_region}'" not in sql


def test_a_demo_or_self_hosted_cluster_maps_region_names_its_own_way() -> None:
    demo = {"*": "us-east1"}
    ddl = schema_ddl("cockroachdb", TOPO, database="d", crdb_regions=demo)
    assert ddl[0] == 'ALTER DATABASE "d" SET PRIMARY REGION "us-east1"'
    assert not any("ADD REGION" in s for s in ddl)  # one region: nothing else to add
    case = crdb_region_case(TOPO, demo)
    assert (
        case
        == "CASE region " + " ".join(f"WHEN '{c}' THEN 'us-east1'" for c in TOPO.codes) + " END"
    )
    named = schema.crdb_region_names(TOPO, {"lon": "eu", "*": "us"})
    assert named == {c: ("eu" if c == "lon" else "us") for c in TOPO.codes}
    # the environment override the writer's --migrate and `meridian ledger migrate` read
    env = {schema.CRDB_REGIONS_ENV: "lon=eu, *=us"}
    assert schema.crdb_regions_from_env(env) == {"lon": "eu", "*": "us"}
    assert schema.crdb_regions_from_env({}) is None
    with pytest.raises(LedgerConfigError) as ei:
        schema.crdb_region_names(TOPO, {"xyz": "us"})
    assert ei.value.field == "crdb_regions"
    with pytest.raises(LedgerConfigError) as ei:
        schema.crdb_regions_from_env({schema.CRDB_REGIONS_ENV: "lon"})
    assert ei.value.field == schema.CRDB_REGIONS_ENV
    with pytest.raises(LedgerConfigError) as ei:
        schema.crdb_region_names(TOPO, {"lon": "eu'--"})
    assert ei.value.field == "crdb_regions.lon"


# ---- finding: survival goal is terraform's; a rerun is safe ----------------------------------


def test_migration_never_sets_a_survival_goal() -> None:
    emitted = cockroach_locality_ddl(_target(), CockroachState(primary_region=None))
    for m in MIGRATIONS:
        emitted += m.statements(_target())
    assert not [s for s in emitted if "SURVIVE" in s.upper()]
    assert not [s for m in MIGRATIONS for s in m.statements(_target()) if "ALTER DATABASE" in s]
    # still available to whoever asks (docs, a self-hosted cluster set up by hand)
    asked = schema.cockroach_database_ddl("d", TOPO, survival="region")
    assert asked[-1] == 'ALTER DATABASE "d" SURVIVE REGION FAILURE'


def test_rerun_on_a_multi_region_database_keeps_its_primary_region() -> None:
    tf = _terraform_names()
    # terraform made the database multi-region (primary = hub) before the first migrate
    rerun = cockroach_locality_ddl(_target(), CockroachState(primary_region=tf[TOPO.hub]))
    assert rerun == [
        f'ALTER DATABASE "ledger" ADD REGION IF NOT EXISTS "{tf[c]}"'
        for c in TOPO.codes
        if c != TOPO.hub
    ]
    # a primary region moved by terraform (or by hand) is not moved back; the hub's is added
    moved = cockroach_locality_ddl(_target(), CockroachState(primary_region=tf["nyc"]))
    assert not [s for s in moved if "PRIMARY" in s]
    assert f'ALTER DATABASE "ledger" ADD REGION IF NOT EXISTS "{tf[TOPO.hub]}"' in moved
    assert f'ALTER DATABASE "ledger" ADD REGION IF NOT EXISTS "{tf["nyc"]}"' not in moved


# ---- optional finding: a region added to the topology ----------------------------------------


def _stored(case: str) -> str:
    """A CASE as CockroachDB shows it in information_schema.columns (typed literals)."""
    return re.sub(
        r"THEN '([^']*)'",
        r"THEN '\1':::public.crdb_internal_region",
        re.sub(r"WHEN '([^']*)'", r"WHEN '\1':::STRING", case),
    )


def test_a_region_added_to_the_topology_gets_a_database_region_and_a_crdb_region() -> None:
    before = dataclasses.replace(TOPO, regions=TOPO.regions[:2])
    assert "sgp" not in before.codes and "sgp" in TOPO.codes
    sgp = _terraform_names()["sgp"]
    old = _stored(crdb_region_case(before))
    state = CockroachState(
        primary_region=_terraform_names()[TOPO.hub],
        region_columns={t.name: (old, ("crdb_region",)) for t in TRANSACTIONAL_TABLES},
    )
    assert f'ALTER DATABASE "ledger" ADD REGION IF NOT EXISTS "{sgp}"' in (
        cockroach_locality_ddl(_target(), state)
    )
    ddl = cockroach_region_columns_ddl(_target(), state)
    new_case = crdb_region_case(TOPO)
    assert f"WHEN 'sgp' THEN '{sgp}'" in new_case
    for t in TRANSACTIONAL_TABLES:
        assert [s for s in ddl if f"ALTER TABLE {t.name} " in s] == [
            f"ALTER TABLE {t.name} ADD COLUMN crdb_region_new crdb_internal_region "
            f"NOT VISIBLE NOT NULL AS ({new_case}) STORED",
            f"ALTER TABLE {t.name} RENAME COLUMN crdb_region TO crdb_region_old, "
            "RENAME COLUMN crdb_region_new TO crdb_region",
            f"ALTER TABLE {t.name} SET LOCALITY REGIONAL BY ROW AS crdb_region",
            f"ALTER TABLE {t.name} DROP COLUMN crdb_region_old",
        ]
    # the old topology (a writer started with it) and a rerun after the change: nothing to do
    unchanged = CockroachState(
        primary_region=state.primary_region,
        region_columns={t.name: (old, ("crdb_region",)) for t in TRANSACTIONAL_TABLES},
    )
    assert cockroach_region_columns_ddl(_target(before), unchanged) == []
    done = CockroachState(
        primary_region=state.primary_region,
        region_columns={
            t.name: (_stored(new_case), ("crdb_region",)) for t in TRANSACTIONAL_TABLES
        },
    )
    assert cockroach_region_columns_ddl(_target(), done) == []


def test_an_interrupted_region_column_change_is_finished_by_the_next_migrate() -> None:
    new = _stored(crdb_region_case(TOPO))
    old = _stored(crdb_region_case(dataclasses.replace(TOPO, regions=TOPO.regions[:2])))
    # stopped after the swap: crdb_region already maps every region, the old one is left
    swapped = schema.cockroach_region_column_ddl(
        "postings", TOPO, expression=new, columns=("crdb_region", "crdb_region_old")
    )
    assert swapped == [
        "ALTER TABLE postings SET LOCALITY REGIONAL BY ROW AS crdb_region",
        "ALTER TABLE postings DROP COLUMN crdb_region_old",
    ]
    # stopped after adding the new column: drop it and start over
    added = schema.cockroach_region_column_ddl(
        "postings", TOPO, expression=old, columns=("crdb_region", "crdb_region_new")
    )
    assert added[0] == "ALTER TABLE postings DROP COLUMN crdb_region_new"
    assert added[1].startswith("ALTER TABLE postings ADD COLUMN crdb_region_new ")
