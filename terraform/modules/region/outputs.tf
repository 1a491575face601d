output "code" {
  description = "Region code."
  value       = var.code
}

output "network_self_link" {
  description = "Self link of the region's VPC (for peering and private DNS)."
  value       = google_compute_network.this.self_link
}

output "subnet_self_link" {
  description = "Self link of the region's subnet."
  value       = google_compute_subnetwork.this.self_link
}

output "subnet_cidr" {
  description = "Address range of the region."
  value       = var.subnet_cidr
}

output "nats_node_addresses" {
  description = "Internal address per NATS node name (n0, n1, ...)."
  value       = { for name, a in google_compute_address.nats : name => a.address }
}

output "nats_tag" {
  description = "Network tag of the NATS nodes."
  value       = local.nats_tag
}

output "redis" {
  description = "Memorystore endpoint (TLS). The AUTH string stays in state/Secret Manager, not here."
  value = {
    host = google_redis_instance.this.host
    port = google_redis_instance.this.port
  }
}
