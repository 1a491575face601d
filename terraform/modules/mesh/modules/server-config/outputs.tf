output "server_config" {
  description = "nats-server configuration text per region code."
  value       = local.server_config
}

output "leaf_remotes" {
  description = "Leaf-node URLs each region dials, in dial order (empty for the hub)."
  value       = local.leaf_remotes
}

output "routes" {
  description = "Cluster route URLs per region."
  value       = local.routes
}

output "jetstream_domains" {
  description = "JetStream domain per region code."
  value       = { for code, r in var.regions : code => r.domain }
}

output "ports" {
  description = "Listening ports per region, for cross-checks against the local mesh."
  value = {
    for code, r in var.regions : code => {
      client  = r.client_port
      leaf    = r.accepts_leaf ? r.leaf_port : null
      monitor = r.monitor_port
      cluster = var.cluster_port
    }
  }
}
