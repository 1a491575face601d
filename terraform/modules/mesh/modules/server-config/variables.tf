variable "hub" {
  description = "Region code of the leaf-node hub (topology.hub)."
  type        = string
}

variable "regions" {
  description = "Topology regions keyed by code, as rendered by `meridian terraform render`."
  type = map(object({
    code              = string
    name              = string
    cloud_region      = string
    domain            = string
    client_port       = number
    leaf_port         = number
    monitor_port      = number
    metrics_port_base = number
    executes          = list(string)
    failover          = list(string)
    accepts_leaf      = bool
    leaf_dial         = list(string)
  }))
}

variable "dns_domain" {
  description = "Private DNS domain of the mesh; nodes are n<i>.<code>.<dns_domain>."
  type        = string
}

variable "nodes_per_region" {
  description = "NATS servers per region (one JetStream cluster per region)."
  type        = number
}

variable "cluster_port" {
  description = "NATS route (intra-region cluster) port."
  type        = number
}

variable "leaf_tls_subject" {
  description = "Certificate subject the accepting side maps to the application account."
  type        = string
}

variable "app_account" {
  description = "Account the leaf links bind (same as the local mesh: MERIDIAN)."
  type        = string
  default     = "MERIDIAN"
}

variable "tls_dir" {
  description = "Directory on the node holding cert.pem, key.pem and ca.pem (from Secret Manager)."
  type        = string
  default     = "/etc/nats/tls"
}

variable "accounts_include" {
  description = "Accounts file (users, passwords; from Secret Manager), RELATIVE to the config file's directory: nats-server resolves includes that way."
  type        = string
  default     = "secrets/accounts.conf"
}

variable "store_dir" {
  description = "JetStream store directory on the node's data disk."
  type        = string
  default     = "/var/lib/nats/jetstream"
}
