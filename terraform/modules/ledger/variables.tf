variable "project_id" {
  description = "GCP project holding the regional VPCs (private endpoints)."
  type        = string
}

variable "cluster_name" {
  description = "CockroachDB Cloud cluster name."
  type        = string
}

variable "regions" {
  description = "Ledger regions: topology region code => GCP region (cloud_region)."
  type        = map(string)

  validation {
    condition     = var.survival_goal != "REGION" || length(var.regions) >= 3
    error_message = "Survival goal REGION needs at least three regions."
  }
}

variable "primary_region" {
  description = "Topology code of the database's primary region (the hub)."
  type        = string
}

variable "survival_goal" {
  description = "Database survival goal: ZONE (lower write latency) or REGION (survives a region)."
  type        = string
  default     = "REGION"

  validation {
    condition     = contains(["ZONE", "REGION"], var.survival_goal)
    error_message = "survival_goal must be ZONE or REGION."
  }
}

variable "database_name" {
  description = "Ledger database name."
  type        = string
  default     = "ledger"
}

variable "networks" {
  description = "Per topology region code: the VPC and subnet where the private endpoint lives."
  type = map(object({
    network    = string
    subnetwork = string
  }))
}

variable "admin_url_secret_id" {
  description = "Secret Manager secret holding an admin SQL URL (a reference; read at apply time)."
  type        = string
}

variable "nodes_per_region" {
  description = "CockroachDB nodes per region."
  type        = number
  default     = 3
}

variable "num_virtual_cpus" {
  description = "vCPUs per node."
  type        = number
  default     = 8
}

variable "storage_gib" {
  description = "Storage per node in GiB."
  type        = number
  default     = 500
}

variable "cockroach_version" {
  description = "Major CockroachDB version of the cluster."
  type        = string
  default     = "v25.2"
}

variable "delete_protection" {
  description = "Refuse to delete the cluster."
  type        = bool
  default     = true
}
