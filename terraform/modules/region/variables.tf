variable "project_id" {
  description = "GCP project."
  type        = string
}

variable "code" {
  description = "Three-letter region code (topology); also the JetStream domain."
  type        = string
}

variable "name" {
  description = "Human name of the region (London, New York, Singapore)."
  type        = string
}

variable "cloud_region" {
  description = "GCP region (topology cloud_region), e.g. europe-west2."
  type        = string
}

variable "subnet_cidr" {
  description = "Address range of this region's subnet."
  type        = string
}

variable "peer_cidrs" {
  description = "Address ranges of the other regions, keyed by region code."
  type        = map(string)
}

variable "client_port" {
  description = "NATS client port (topology)."
  type        = number
}

variable "leaf_port" {
  description = "NATS leaf-node port (topology); opened only when accepts_leaf."
  type        = number
}

variable "monitor_port" {
  description = "NATS HTTP monitoring port (topology)."
  type        = number
}

variable "metrics_port_base" {
  description = "First worker metrics port (topology); workers_per_node ports from here."
  type        = number
}

variable "accepts_leaf" {
  description = "Whether this region listens for leaf-node links (topology)."
  type        = bool
}

variable "nats_server_config" {
  description = "nats-server.conf for this region (mesh module output; contains no secrets)."
  type        = string
}

variable "secret_ids" {
  description = "Secret Manager secret ids (references, never values) the nodes read at boot."
  type = object({
    tls_cert = string
    tls_key  = string
    tls_ca   = string
    accounts = string
  })
}

variable "node_count" {
  description = "NATS servers in this region's JetStream cluster."
  type        = number
  default     = 3

  validation {
    condition     = var.node_count >= 3 && var.node_count % 2 == 1
    error_message = "A JetStream cluster needs an odd number of servers, at least 3 (R3 streams)."
  }
}

variable "cluster_port" {
  description = "NATS route port; open only inside this region's subnet."
  type        = number
  default     = 6222
}

variable "exporter_port" {
  description = "prometheus-nats-exporter port on every node (monitoring)."
  type        = number
  default     = 7777
}

variable "workers_per_node" {
  description = "Worker processes per node, each exposing metrics_port_base + i."
  type        = number
  default     = 5 # gateway, risk, execution, ledger, md (ops/services.py METRICS_OFFSETS)
}

variable "machine_type" {
  description = "Machine type of a NATS node."
  type        = string
  default     = "c3-standard-8"
}

variable "data_disk_gb" {
  description = "JetStream data disk per node (pd-ssd)."
  type        = number
  default     = 500
}

variable "image" {
  description = "Boot image of the NATS nodes."
  type        = string
  default     = "debian-cloud/debian-12"
}

variable "nats_server_version" {
  description = "nats-server release installed on the nodes (same minor as the local mesh)."
  type        = string
  default     = "2.15.1"
}

variable "nats_server_sha256" {
  description = "SHA-256 of the nats-server linux-amd64 .tar.gz release asset (checked at boot)."
  type        = string
  default     = ""
}

variable "nats_exporter_url" {
  description = "Release tarball of nats-io/prometheus-nats-exporter (pin a version you have verified)."
  type        = string
  default     = "https://github.com/nats-io/prometheus-nats-exporter/releases/download/v0.17.3/prometheus-nats-exporter-v0.17.3-linux-amd64.tar.gz"
}

variable "redis_memory_size_gb" {
  description = "Memorystore for Redis capacity."
  type        = number
  default     = 5
}

variable "redis_version" {
  description = "Memorystore Redis version."
  type        = string
  default     = "REDIS_7_2"
}

variable "labels" {
  description = "Labels added to every resource that takes them."
  type        = map(string)
  default     = {}
}
