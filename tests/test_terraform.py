"""terraform/ against the topology: formatting, drift, module wiring, and the rendered configs.

``terraform validate`` needs providers that cannot be downloaded here, so the wiring is checked by
parsing every ``.tf`` file with python-hcl2. The provider-free ``server-config`` submodule is
evaluated for real (``terraform init -backend=false`` + ``apply``: no network, no providers) and
the resulting nats-server configs are compared with the local mesh's (``regions/natsconf.py``)
and checked by the real ``nats-server -t``. Fast: no servers started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest

from regions import natsconf
from regions.terraform import DEFAULT_TFVARS, dumps_tfvars, render_tfvars, write_tfvars
from regions.topology import DEFAULT_TOPOLOGY, Topology, load_topology, parse_topology

REPO = Path(__file__).resolve().parent.parent
TF = REPO / "terraform"
ROOT = TF / "envs" / "production"
SERVER_CONFIG = TF / "modules" / "mesh" / "modules" / "server-config"
MODULES = ("region", "mesh", "ledger", "observability")
META_ARGS = {"source", "version", "for_each", "count", "providers", "depends_on", "__is_block__"}


def _terraform() -> str | None:
    found = shutil.which("terraform")
    if found:
        return found
    return "/usr/local/bin/terraform" if os.access("/usr/local/bin/terraform", os.X_OK) else None


TERRAFORM = _terraform()
needs_terraform = pytest.mark.skipif(
    TERRAFORM is None, reason="terraform binary not found (PATH, /usr/local/bin): check skipped"
)


# ---- HCL helpers -----------------------------------------------------------------------------


def _unq(s: str) -> str:
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s


@cache
def _parsed(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return dict(hcl2.load(f))


def _tf_dirs() -> list[Path]:
    return sorted({p.parent for p in TF.rglob("*.tf") if ".terraform" not in p.parts})


def _blocks(d: Path, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, body) of every ``kind`` block (variable, output, module, ...) in directory d."""
    for f in sorted(d.glob("*.tf")):
        for entry in _parsed(f).get(kind, []):
            for label, body in entry.items():
                yield _unq(label), body


def _variables(d: Path) -> dict[str, bool]:
    """Variable name -> required (no default)."""
    return {name: "default" not in body for name, body in _blocks(d, "variable")}


def _outputs(d: Path) -> set[str]:
    return {name for name, _ in _blocks(d, "output")}


def _locals(d: Path) -> set[str]:
    names: set[str] = set()
    for f in sorted(d.glob("*.tf")):
        for entry in _parsed(f).get("locals", []):
            names |= {k for k in entry if k != "__is_block__"}
    return names


def _module_calls(d: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    calls = {}
    for name, body in _blocks(d, "module"):
        source = _unq(body["source"])
        assert source.startswith("."), f"{d}: module {name} must use a local source, got {source}"
        calls[name] = ((d / source).resolve(), body)
    return calls


def _code_text(d: Path) -> str:
    """All .tf text of a directory without comments (references in comments don't count)."""
    text = "\n".join(p.read_text() for p in sorted(d.glob("*.tf")))
    return re.sub(r"(?m)^\s*#.*$", "", text)


# ---- formatting and drift ----------------------------------------------------------------------


@needs_terraform
def test_terraform_fmt_is_clean() -> None:
    assert TERRAFORM is not None
    proc = subprocess.run(
        [TERRAFORM, "fmt", "-check", "-recursive", "-diff", str(TF)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, f"run `terraform fmt -recursive terraform/`:\n{proc.stdout}"


def test_committed_tfvars_equal_fresh_render_of_default_topology() -> None:
    committed = DEFAULT_TFVARS.read_text()
    fresh = dumps_tfvars(load_topology(DEFAULT_TOPOLOGY))
    assert committed == fresh, (
        "terraform/envs/production/terraform.tfvars.json drifted from regions/topology.toml: "
        "run `meridian terraform render`"
    )


def test_render_carries_every_topology_fact() -> None:
    topo = load_topology()
    tfvars = render_tfvars(topo)
    assert tfvars["hub"] == topo.hub == "lon"
    assert tfvars["topology_version"] == topo.version
    assert list(tfvars["regions"]) == list(topo.codes)
    for r in topo.regions:
        v = tfvars["regions"][r.code]
        assert v["domain"] == r.domain == r.code
        assert (v["client_port"], v["leaf_port"], v["monitor_port"], v["metrics_port_base"]) == (
            r.client_port,
            r.leaf_port,
            r.monitor_port,
            r.metrics_port_base,
        )
        assert v["executes"] == list(r.executes)
        assert v["failover"] == list(r.failover)
        assert v["leaf_dial"] == list(r.leaf_dial)
        assert v["accepts_leaf"] is r.accepts_leaf
        assert v["cloud_region"] == r.cloud_region
    assert tfvars["regions"]["sgp"]["leaf_dial"] == ["lon", "nyc"]
    assert tfvars["regions"]["nyc"]["leaf_dial"] == ["lon"]
    assert tfvars["links"]["lon-sgp"] == {"a": "lon", "b": "sgp", "one_way_ms": 85.0}
    assert {s for v in tfvars["regions"].values() for s in v["executes"]} == {
        i.symbol for i in topo.instruments
    }


def _topology_with_frankfurt() -> Topology:
    raw = tomllib.loads(DEFAULT_TOPOLOGY.read_text())
    for r in raw["regions"]:
        r["failover"] = [*r["failover"], "fra"]
    raw["regions"].append(
        {
            "code": "fra",
            "name": "Frankfurt",
            "cloud_region": "europe-west3",
            "client_port": 4340,
            "leaf_port": 7440,
            "monitor_port": 8340,
            "metrics_port_base": 9340,
            "executes": [],
            "failover": ["fra", "lon", "nyc", "sgp"],
            "accepts_leaf": False,
            "leaf_dial": ["lon"],
        }
    )
    raw["links"].append({"a": "lon", "b": "fra", "one_way_ms": 8})
    return parse_topology(raw, source="<test: +fra>")


def test_added_region_appears_in_rendered_tfvars(tmp_path: Path) -> None:
    topo = _topology_with_frankfurt()
    out = write_tfvars(topo, tmp_path / "prod" / "terraform.tfvars.json")
    tfvars = json.loads(out.read_text())
    assert list(tfvars["regions"]) == ["lon", "nyc", "sgp", "fra"]
    fra = tfvars["regions"]["fra"]
    assert fra["domain"] == "fra"
    assert (fra["client_port"], fra["leaf_port"], fra["monitor_port"]) == (4340, 7440, 8340)
    assert fra["leaf_dial"] == ["lon"]
    assert fra["cloud_region"] == "europe-west3"
    assert tfvars["links"]["lon-fra"]["one_way_ms"] == 8.0
    assert tfvars["regions"]["lon"]["failover"] == ["lon", "nyc", "sgp", "fra"]
    # ...and it differs from the committed file, so the drift test would catch a stale commit.
    assert out.read_text() != DEFAULT_TFVARS.read_text()


# ---- HCL structure ---------------------------------------------------------------------------


def test_layout_has_every_module_with_its_files() -> None:
    for m in MODULES:
        d = TF / "modules" / m
        for f in ("main.tf", "variables.tf", "outputs.tf", "versions.tf", "README.md"):
            assert (d / f).is_file(), f"missing terraform/modules/{m}/{f}"
    for f in ("main.tf", "variables.tf", "versions.tf", "terraform.tfvars.json"):
        assert (ROOT / f).is_file(), f"missing terraform/envs/production/{f}"
    assert (TF / "README.md").is_file()


def test_every_tf_file_parses() -> None:
    files = [p for p in TF.rglob("*.tf") if ".terraform" not in p.parts]
    assert len(files) >= 24
    for p in files:
        assert isinstance(_parsed(p), dict), p


def test_module_calls_pass_every_required_variable_and_no_unknown_one() -> None:
    seen = set()
    for d in _tf_dirs():
        for name, (target, body) in _module_calls(d).items():
            variables = _variables(target)
            assert variables, f"{d}: module {name} -> {target} declares no variables"
            args = set(body) - META_ARGS
            missing = {v for v, required in variables.items() if required} - args
            unknown = args - set(variables)
            where = f"{d.relative_to(REPO)}: module {name!r} ({target.relative_to(REPO)})"
            assert not missing, f"{where} does not pass required variables {sorted(missing)}"
            assert not unknown, f"{where} passes undeclared arguments {sorted(unknown)}"
            seen.add(target.relative_to(TF).as_posix())
    assert seen == {
        "modules/region",
        "modules/mesh",
        "modules/ledger",
        "modules/observability",
        "modules/mesh/modules/server-config",
    }


def test_references_resolve_to_declared_variables_locals_and_module_outputs() -> None:
    for d in _tf_dirs():
        text = _code_text(d)
        where = d.relative_to(REPO)
        used_vars = set(re.findall(r"\bvar\.(\w+)", text))
        assert used_vars <= set(_variables(d)), (
            f"{where}: undeclared {used_vars - set(_variables(d))}"
        )
        used_locals = set(re.findall(r"\blocal\.(\w+)", text))
        assert used_locals <= _locals(d), f"{where}: undeclared locals {used_locals - _locals(d)}"
        calls = _module_calls(d)
        for mod, out in re.findall(r"\bmodule\.(\w+)(?:\[[^\]]*\])?\.(\w+)", text):
            assert mod in calls, f"{where}: module.{mod} is not declared"
            assert out in _outputs(calls[mod][0]), f"{where}: module.{mod} has no output {out!r}"
        for m, (_, _body) in calls.items():
            # for-expressions over a module's instances: `for k, m in module.region : ... m.x`
            for out in re.findall(rf"in module\.{m} : [^}}\]]*?\bm\.(\w+)", text):
                assert out in _outputs(calls[m][0]), f"{where}: module.{m} has no output {out!r}"


def test_every_region_of_the_topology_has_its_region_instance() -> None:
    calls = _module_calls(ROOT)
    _, region = calls["region"]
    assert region["for_each"] == "${var.regions}", "the root must instantiate region per region"
    topo = load_topology()
    tfvars = json.loads(DEFAULT_TFVARS.read_text())
    assert set(tfvars["regions"]) == set(topo.codes)
    # Every region also needs an address range (the only per-region setting outside topology).
    (cidrs,) = [b for n, b in _blocks(ROOT, "variable") if n == "region_cidrs"]
    assert set(topo.codes) <= set(cidrs["default"]), "add the new region to region_cidrs"
    # The other per-region modules iterate the same regions variable.
    for name in ("mesh", "observability"):
        assert calls[name][1]["regions"] == "${var.regions}"
    assert "var.regions" in calls["ledger"][1]["regions"]


def test_provider_versions_are_pinned_and_backend_holds_no_secrets() -> None:
    pinned = set()
    for f in sorted(p for p in TF.rglob("*.tf") if ".terraform" not in p.parts):
        for body in _parsed(f).get("terraform", []):
            for entry in body.get("required_providers", []):
                for name, spec in entry.items():
                    if name == "__is_block__":
                        continue
                    version = spec["version"]
                    assert re.fullmatch(r'"\d+\.\d+\.\d+"', version), f"{f}: {name} not pinned"
                    pinned.add((name, version))
    # One version per provider across the root and all modules.
    assert len(pinned) == len({name for name, _ in pinned}) == 2, pinned
    backend = _parsed(ROOT / "versions.tf")["terraform"][0]["backend"][0]
    assert set(backend) == {'"gcs"'}
    # Only the state prefix is committed; bucket, KMS key and identity come from -backend-config.
    assert {k for k in backend['"gcs"'] if not k.startswith("__")} == {"prefix"}


def test_no_secret_values_in_variables() -> None:
    for d in _tf_dirs():
        for name, body in _blocks(d, "variable"):
            assert not re.search(r"password|token|api_key|private_key", name), f"{d}: {name}"
            assert body.get("sensitive") is not True, f"{d}: {name} carries a secret value"
    tfvars = DEFAULT_TFVARS.read_text().lower()
    assert "password" not in tfvars and "secret" not in tfvars


def test_observability_loads_rules_from_ops_prometheus() -> None:
    text = (ROOT / "main.tf").read_text()
    (rel,) = re.findall(r'"\$\{path\.root\}/([^"]+rules\.yml)"', text)
    assert (ROOT / rel).resolve() == REPO / "ops" / "prometheus" / "rules.yml"


# ---- the rendered production nats-server configs vs the local mesh ------------------------------


def _natsconf_facts(text: str) -> dict[str, Any]:
    head, _, leaf = text.partition("leafnodes {")
    return {
        "client": int(re.search(r'^listen: "[^"]*:(\d+)"', head, re.M).group(1)),  # type: ignore[union-attr]
        "monitor": int(re.search(r'^http: "[^"]*:(\d+)"', head, re.M).group(1)),  # type: ignore[union-attr]
        "domain": re.search(r'domain: "(\w+)"', head).group(1),  # type: ignore[union-attr]
        "leaf_listen": [int(p) for p in re.findall(r'listen: "[^"]*:(\d+)"', leaf)],
        "remote_ports": [int(p) for p in re.findall(r":(\d+)\"?(?=[,\]])", leaf)],
        "reconnect": re.findall(r'reconnect: "([^"]+)"', leaf),
        "no_advertise": "no_advertise: true" in leaf,
        "no_randomize": "no_randomize: true" in leaf,
        "ping": re.findall(r"^(ping_interval: .*|ping_max: .*)$", head, re.M),
    }


@pytest.fixture(scope="module")
def production_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Evaluate the provider-free server-config submodule with the committed tfvars."""
    if TERRAFORM is None:
        pytest.skip("terraform binary not found (PATH, /usr/local/bin): check skipped")
    work = tmp_path_factory.mktemp("tf-server-config")
    (work / "main.tf").write_text(
        f"""
variable "hub" {{ type = string }}
variable "regions" {{ type = any }}
variable "links" {{ type = any }}
variable "topology_version" {{ type = number }}
module "sc" {{
  source           = "{SERVER_CONFIG}"
  hub              = var.hub
  regions          = var.regions
  dns_domain       = "meridian.internal"
  nodes_per_region = 3
  cluster_port     = 6222
  leaf_tls_subject = "CN=leaf.meridian.internal"
  tls_dir          = "{work}/tls"
  store_dir        = "{work}/js"
}}
output "server_config" {{ value = module.sc.server_config }}
"""
    )
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    for args in (
        ["init", "-backend=false", "-input=false", "-no-color"],
        ["apply", "-auto-approve", "-input=false", "-no-color", f"-var-file={DEFAULT_TFVARS}"],
    ):
        proc = subprocess.run(
            [TERRAFORM, *args], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"terraform {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    out = subprocess.run(
        [TERRAFORM, "output", "-json", "server_config"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    paths = {}
    for code, text in json.loads(out.stdout).items():
        paths[code] = work / f"{code}.conf"
        paths[code].write_text(text)
    return paths


def _local_config(topo: Topology, code: str, tmp: Path) -> str:
    layout = natsconf.ServerLayout(
        store_dir=tmp / code,
        leaf_urls={r.code: f"127.0.0.1:{r.leaf_port}" for r in topo.regions},
    )
    return natsconf.render_server_config(topo, code, layout, natsconf.Credentials.generate())


def test_production_and_local_nats_configs_agree_on_ports_domains_and_leaf_links(
    production_configs: dict[str, Path], tmp_path: Path
) -> None:
    topo = load_topology()
    tfvars = json.loads(DEFAULT_TFVARS.read_text())
    assert set(production_configs) == set(topo.codes)
    leaf_port_to_code = {r.leaf_port: r.code for r in topo.regions}
    for r in topo.regions:
        prod = _natsconf_facts(production_configs[r.code].read_text())
        local = _natsconf_facts(_local_config(topo, r.code, tmp_path))
        v = tfvars["regions"][r.code]
        for facts in (prod, local):
            assert facts["client"] == v["client_port"] == r.client_port
            assert facts["monitor"] == v["monitor_port"] == r.monitor_port
            assert facts["domain"] == v["domain"] == r.code
            assert facts["leaf_listen"] == ([r.leaf_port] if r.accepts_leaf else [])
            dialed = [leaf_port_to_code[p] for p in facts["remote_ports"]]
            assert dialed == v["leaf_dial"] == list(r.leaf_dial)
        for key in ("reconnect", "no_advertise", "no_randomize", "ping"):
            assert prod[key] == local[key], f"{r.code}: {key} differs from the local mesh"
    assert "password" not in "".join(p.read_text() for p in production_configs.values())


def test_production_nats_configs_are_accepted_by_nats_server(
    production_configs: dict[str, Path],
) -> None:
    server = shutil.which("nats-server", path=str(REPO / ".venv" / "bin"))
    openssl = shutil.which("openssl")
    if server is None or openssl is None:
        pytest.skip("needs .venv/bin/nats-server and openssl")
    work = next(iter(production_configs.values())).parent
    tls = work / "tls"
    tls.mkdir(exist_ok=True)
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=leaf.meridian.internal",
            "-keyout",
            str(tls / "key.pem"),
            "-out",
            str(tls / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    shutil.copy(tls / "cert.pem", tls / "ca.pem")
    # The accounts file the nodes fetch from Secret Manager: the local mesh's accounts block.
    local = _local_config(load_topology(), "lon", work)
    accounts = local[local.index("accounts {") : local.index("leafnodes {")]
    (work / "secrets").mkdir(exist_ok=True)
    (work / "secrets" / "accounts.conf").write_text(accounts)
    for code, conf in production_configs.items():
        proc = subprocess.run(
            [server, "-t", "-c", str(conf)],
            env={**os.environ, "NATS_SERVER_NAME": f"{code}-n0"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, f"{code}: {proc.stdout}{proc.stderr}"


def test_cli_terraform_render_writes_the_variables_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from ops.cli_terraform import register

    parser = argparse.ArgumentParser(prog="meridian")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "terraform.tfvars.json"
    args = parser.parse_args(["terraform", "render", "--out", str(out)])
    assert args.func(args) == 0
    assert out.read_text() == DEFAULT_TFVARS.read_text()
    assert str(out) in capsys.readouterr().out

    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nhub = "xyz"\n')
    args = parser.parse_args(["terraform", "render", "--topology", str(bad), "--out", str(out)])
    assert args.func(args) == 2
    assert "regions: at least one region is required" in capsys.readouterr().err


def test_production_scrapes_what_the_shipped_rules_alert_on() -> None:
    """The rules ship unchanged to production: its scrape jobs must match the rules'
    `meridian.*` job regex (they were `nats`, `workers`: MeridianTargetDown matched none),
    every worker's metrics port must be scraped (the md worker's, offset 4, was not: the
    market-data alerts had no series), and the exporter must start (`-serverz` is no flag
    of prometheus-nats-exporter: it exited at once)."""
    from ops.services import METRICS_OFFSETS

    obs = (TF / "modules" / "observability" / "main.tf").read_text()
    rules = (REPO / "ops" / "prometheus" / "rules.yml").read_text()
    (job_re,) = re.findall(r'up\{job=~"([^"]+)"\}', rules)
    jobs = re.findall(r'job_name\s*=\s*"([^"]+)"', obs)
    # the servers' jobs are under the rules' MeridianTargetDown; the workers' job is not (a
    # single-writer worker runs on one node of the region, every node is scraped)
    assert {j for j in jobs if re.fullmatch(job_re, j)} == {"meridian-nats", "meridian-nats-remote"}
    assert "workers" in jobs
    for mod in ("observability", "region"):
        (var,) = [
            b for n, b in _blocks(TF / "modules" / mod, "variable") if n == "workers_per_node"
        ]
        assert var["default"] >= max(METRICS_OFFSETS.values()) + 1, (mod, var)
    startup = (TF / "modules" / "region" / "templates" / "startup.sh.tftpl").read_text()
    (line,) = [ln for ln in startup.splitlines() if "ExecStart=" in ln and "exporter" in ln]
    flags = set(re.findall(r" -(\w+)", line.split("prometheus-nats-exporter)", 1)[1]))
    assert flags <= {
        "port",
        "varz",
        "connz",
        "connz_detailed",
        "routez",
        "leafz",
        "jsz",
        "healthz",
        "subz",
        "gatewayz",
        "accstatz",
        "accountz",
    }, flags
