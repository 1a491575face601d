# The geo-partitioned ledger: one CockroachDB Cloud (Advanced/dedicated) cluster across the
# topology's cloud regions, reached from each regional VPC through Private Service Connect.
# The database is multi-region (primary = hub) with the chosen survival goal; tables are made
# REGIONAL BY ROW by the ledger's own migrations (primary keys start with the region column).

locals {
  # CockroachDB Cloud names GCP regions "gcp-<region>" inside SQL.
  crdb_region = { for code, cloud in var.regions : code => "gcp-${cloud}" }

  locality_sql = join("\n", concat(
    ["ALTER DATABASE ${var.database_name} SET PRIMARY REGION \"${local.crdb_region[var.primary_region]}\";"],
    [
      for code, r in local.crdb_region :
      "ALTER DATABASE ${var.database_name} ADD REGION IF NOT EXISTS \"${r}\";" if code != var.primary_region
    ],
    ["ALTER DATABASE ${var.database_name} SURVIVE ${var.survival_goal} FAILURE;"],
  ))
}

resource "cockroach_cluster" "ledger" {
  name              = var.cluster_name
  cloud_provider    = "GCP"
  plan              = "ADVANCED"
  cockroach_version = var.cockroach_version
  delete_protection = var.delete_protection

  dedicated = {
    storage_gib      = var.storage_gib
    num_virtual_cpus = var.num_virtual_cpus
  }

  regions = [
    for code, cloud in var.regions : {
      name       = cloud
      node_count = var.nodes_per_region
    }
  ]

  backup_config = {
    enabled           = true
    frequency_minutes = 60
    retention_days    = 30
  }
}

resource "cockroach_database" "ledger" {
  cluster_id = cockroach_cluster.ledger.id
  name       = var.database_name
}

# ---- private connectivity: one PSC endpoint per region ----------------------------------------

resource "cockroach_private_endpoint_services" "ledger" {
  cluster_id = cockroach_cluster.ledger.id
}

resource "google_compute_address" "psc" {
  for_each = var.regions

  project      = var.project_id
  name         = "meridian-${each.key}-ledger-psc"
  region       = each.value
  subnetwork   = var.networks[each.key].subnetwork
  address_type = "INTERNAL"
}

resource "google_compute_forwarding_rule" "psc" {
  for_each = var.regions

  project               = var.project_id
  name                  = "meridian-${each.key}-ledger-psc"
  region                = each.value
  network               = var.networks[each.key].network
  ip_address            = google_compute_address.psc[each.key].id
  load_balancing_scheme = ""
  target = one([
    for s in cockroach_private_endpoint_services.ledger.services : s.name if s.region_name == each.value
  ])
}

resource "cockroach_private_endpoint_connection" "ledger" {
  for_each = var.regions

  cluster_id  = cockroach_cluster.ledger.id
  endpoint_id = google_compute_forwarding_rule.psc[each.key].psc_connection_id
}

# ---- database locality and survival goal ------------------------------------------------------
# The provider has no resource for a database's regions or survival goal, so they are applied as
# SQL with the admin URL read from Secret Manager at apply time (never a variable, never state).
# Re-runs whenever the statements change (e.g. a region is added or the goal changes).

resource "terraform_data" "database_locality" {
  triggers_replace = [cockroach_database.ledger.id, local.locality_sql]

  provisioner "local-exec" {
    interpreter = ["/bin/bash", "-c"]
    command     = "cockroach sql --url \"$(gcloud secrets versions access latest --secret=\"$SECRET\" --project=\"$PROJECT\")\" -e \"$SQL\""
    environment = {
      SECRET  = var.admin_url_secret_id
      PROJECT = var.project_id
      SQL     = local.locality_sql
    }
  }

  depends_on = [cockroach_private_endpoint_connection.ledger]
}
