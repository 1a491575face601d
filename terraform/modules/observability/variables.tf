variable "project_id" {
  description = "GCP project."
  type        = string
}

variable "regions" {
  description = "Topology regions keyed by code (ports and cloud_region are used)."
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

variable "node_addresses" {
  description = "Internal address per NATS node name per region code (region module outputs)."
  type        = map(map(string))
}

variable "subnets" {
  description = "Subnet self link per region code, where that region's Prometheus runs."
  type        = map(string)
}

variable "rule_files" {
  description = "Prometheus alert/recording rule files (repo: ops/prometheus/*.yml), loaded verbatim."
  type        = list(string)

  validation {
    condition     = alltrue([for f in var.rule_files : fileexists(f)])
    error_message = "Every rule file must exist (ops/prometheus/rules.yml is written by the ops work)."
  }
}

variable "exporter_port" {
  description = "prometheus-nats-exporter port on the NATS nodes."
  type        = number
  default     = 7777
}

variable "workers_per_node" {
  description = "Worker metrics endpoints per node: metrics_port_base + 0..n-1."
  type        = number
  default     = 5 # gateway, risk, execution, ledger, md (ops/services.py METRICS_OFFSETS)
}

variable "scrape_interval" {
  description = "Prometheus scrape interval."
  type        = string
  default     = "5s"
}

variable "retention" {
  description = "Prometheus TSDB retention."
  type        = string
  default     = "30d"
}

variable "machine_type" {
  description = "Machine type of a Prometheus instance."
  type        = string
  default     = "e2-standard-4"
}

variable "labels" {
  description = "Labels added to every resource that takes them."
  type        = map(string)
  default     = {}
}
