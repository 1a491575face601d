output "nats_client_urls" {
  description = "Client URLs per region, in the region's failover order."
  value       = module.mesh.client_urls
}

output "leaf_remotes" {
  description = "Leaf-node URLs each region dials, in order."
  value       = module.mesh.leaf_remotes
}

output "jetstream_domains" {
  description = "JetStream domain per region."
  value       = module.mesh.jetstream_domains
}

output "redis" {
  description = "Memorystore endpoint per region."
  value       = { for code, m in module.region : code => m.redis }
}

output "ledger" {
  description = "Ledger cluster id, SQL regions and survival goal."
  value = {
    cluster_id       = module.ledger.cluster_id
    database_regions = module.ledger.database_regions
    survival_goal    = module.ledger.survival_goal
    endpoints        = module.ledger.private_endpoint_addresses
  }
}

output "prometheus" {
  description = "Prometheus address per region."
  value       = module.observability.prometheus_addresses
}
