# Meridian production: every region of the topology (regions/topology.toml, rendered into
# terraform.tfvars.json) gets a region, joined by the leaf-node mesh, sharing one multi-region
# ledger, each watched by its own Prometheus. Adding a region = topology + render + region_cidrs.

locals {
  labels = { env = "production", topology_version = tostring(var.topology_version) }

  # Repo-relative: terraform/envs/production -> <repo>/ops/prometheus/rules.yml
  rule_files = (
    var.prometheus_rule_files != null
    ? var.prometheus_rule_files
    : ["${path.root}/../../../ops/prometheus/rules.yml"]
  )

  nats_secret_ids = {
    tls_cert = var.secret_ids.tls_cert
    tls_key  = var.secret_ids.tls_key
    tls_ca   = var.secret_ids.tls_ca
    accounts = var.secret_ids.accounts
  }
}

# Secret containers only: versions (the values) are added out of band, never by terraform.
resource "google_secret_manager_secret" "this" {
  for_each = toset(values(var.secret_ids))

  project   = var.project_id
  secret_id = each.value
  labels    = local.labels

  replication {
    auto {}
  }
}

module "region" {
  source   = "../../modules/region"
  for_each = var.regions

  project_id         = var.project_id
  code               = each.value.code
  name               = each.value.name
  cloud_region       = each.value.cloud_region
  subnet_cidr        = var.region_cidrs[each.key]
  peer_cidrs         = { for code, cidr in var.region_cidrs : code => cidr if code != each.key && contains(keys(var.regions), code) }
  client_port        = each.value.client_port
  leaf_port          = each.value.leaf_port
  monitor_port       = each.value.monitor_port
  metrics_port_base  = each.value.metrics_port_base
  accepts_leaf       = each.value.accepts_leaf
  nats_server_config = module.mesh.server_config[each.key]
  secret_ids         = { for k, id in local.nats_secret_ids : k => google_secret_manager_secret.this[id].secret_id }
  node_count         = var.nats_nodes_per_region
  cluster_port       = var.nats_cluster_port
  machine_type       = var.nats_machine_type
  labels             = local.labels
}

module "mesh" {
  source = "../../modules/mesh"

  project_id       = var.project_id
  hub              = var.hub
  regions          = var.regions
  links            = var.links
  networks         = { for code, m in module.region : code => m.network_self_link }
  node_addresses   = { for code, m in module.region : code => m.nats_node_addresses }
  nodes_per_region = var.nats_nodes_per_region
  cluster_port     = var.nats_cluster_port
  dns_domain       = var.dns_domain
}

module "ledger" {
  source = "../../modules/ledger"

  project_id          = var.project_id
  cluster_name        = "meridian-ledger"
  regions             = { for code, r in var.regions : code => r.cloud_region }
  primary_region      = var.hub
  survival_goal       = var.ledger_survival_goal
  nodes_per_region    = var.ledger_nodes_per_region
  admin_url_secret_id = google_secret_manager_secret.this[var.secret_ids.ledger_admin_url].secret_id
  networks = {
    for code, m in module.region : code => {
      network    = m.network_self_link
      subnetwork = m.subnet_self_link
    }
  }
}

module "observability" {
  source = "../../modules/observability"

  project_id     = var.project_id
  regions        = var.regions
  node_addresses = { for code, m in module.region : code => m.nats_node_addresses }
  subnets        = { for code, m in module.region : code => m.subnet_self_link }
  rule_files     = local.rule_files
  labels         = local.labels
}
