# ---- topology: rendered into terraform.tfvars.json by `meridian terraform render` -------------
# Do not edit these values by hand: change regions/topology.toml and re-render.

variable "topology_version" {
  description = "Version of the topology file the variables were rendered from."
  type        = number
}

variable "hub" {
  description = "Leaf-node hub region code."
  type        = string
}

variable "regions" {
  description = "Topology regions keyed by code."
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

  validation {
    condition     = alltrue([for code, r in var.regions : r.code == code && r.domain == code])
    error_message = "Each region is keyed by its code, and its JetStream domain is its code."
  }
}

variable "links" {
  description = "Topology links (one-way latency) keyed by a-b."
  type = map(object({
    a          = string
    b          = string
    one_way_ms = number
  }))
}

# ---- production settings that are not topology ------------------------------------------------

variable "project_id" {
  description = "GCP project of production (pass with -var or TF_VAR_project_id; not a secret)."
  type        = string
}

variable "region_cidrs" {
  description = "Address plan: one /20 per region. A region added to the topology needs a range here."
  type        = map(string)
  default = {
    lon = "10.10.0.0/20"
    nyc = "10.20.0.0/20"
    sgp = "10.30.0.0/20"
  }

  validation {
    condition     = alltrue([for code in keys(var.regions) : contains(keys(var.region_cidrs), code)])
    error_message = "Every topology region needs an address range in region_cidrs."
  }
}

variable "nats_nodes_per_region" {
  description = "NATS servers per region (JetStream cluster, R3 streams)."
  type        = number
  default     = 3
}

variable "nats_cluster_port" {
  description = "NATS route port inside a region."
  type        = number
  default     = 6222
}

variable "nats_machine_type" {
  description = "Machine type of the NATS nodes."
  type        = string
  default     = "c3-standard-8"
}

variable "dns_domain" {
  description = "Private DNS domain of the mesh."
  type        = string
  default     = "meridian.internal"
}

variable "secret_ids" {
  description = "Secret Manager secret ids (names only; values are added out of band, see README)."
  type = object({
    tls_cert         = string
    tls_key          = string
    tls_ca           = string
    accounts         = string
    ledger_admin_url = string
  })
  default = {
    tls_cert         = "meridian-nats-tls-cert"
    tls_key          = "meridian-nats-tls-key"
    tls_ca           = "meridian-nats-tls-ca"
    accounts         = "meridian-nats-accounts"
    ledger_admin_url = "meridian-ledger-admin-url"
  }
}

variable "ledger_survival_goal" {
  description = "CockroachDB survival goal of the ledger database: ZONE or REGION."
  type        = string
  default     = "REGION"
}

variable "ledger_nodes_per_region" {
  description = "CockroachDB nodes per region."
  type        = number
  default     = 3
}

variable "prometheus_rule_files" {
  description = "Rule files loaded into every Prometheus; null = the repo's ops/prometheus/rules.yml."
  type        = list(string)
  default     = null
}
