output "server_config" {
  description = "nats-server configuration text per region code (no secrets: see the include)."
  value       = module.server_config.server_config
}

output "leaf_remotes" {
  description = "Leaf-node URLs each region dials, in order."
  value       = module.server_config.leaf_remotes
}

output "jetstream_domains" {
  description = "JetStream domain per region code."
  value       = module.server_config.jetstream_domains
}

output "leaf_tls_subject" {
  description = "Certificate subject the leaf acceptors map to the application account."
  value       = local.leaf_tls_subject
}

output "dns_zone" {
  description = "Private DNS zone name and domain."
  value = {
    name     = google_dns_managed_zone.mesh.name
    dns_name = google_dns_managed_zone.mesh.dns_name
  }
}

output "client_urls" {
  description = "Client URL per region (TLS), in each region's failover order."
  value = {
    for code, r in var.regions : code => [
      for f in r.failover : "tls://nats.${f}.${var.dns_domain}:${var.regions[f].client_port}"
    ]
  }
}
