output "cluster_id" {
  description = "CockroachDB Cloud cluster id."
  value       = cockroach_cluster.ledger.id
}

output "sql_dns" {
  description = "SQL host per GCP region (private endpoint DNS)."
  value       = { for r in cockroach_cluster.ledger.regions : r.name => r.internal_dns }
}

output "private_endpoint_addresses" {
  description = "Private endpoint address per topology region code."
  value       = { for code, a in google_compute_address.psc : code => a.address }
}

output "database_regions" {
  description = "CockroachDB region name per topology region code (REGIONAL BY ROW values)."
  value       = local.crdb_region
}

output "survival_goal" {
  description = "The database's survival goal."
  value       = var.survival_goal
}

output "locality_sql" {
  description = "Statements that set the database's regions and survival goal."
  value       = local.locality_sql
}
