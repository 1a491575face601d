output "prometheus_addresses" {
  description = "Internal address of each region's Prometheus."
  value       = { for code, i in google_compute_instance.prometheus : code => i.network_interface[0].network_ip }
}

output "prometheus_config" {
  description = "Rendered prometheus.yml per region code."
  value       = local.prometheus_config
}

output "rule_files" {
  description = "Names of the rule files loaded into every Prometheus."
  value       = keys(local.rules)
}
