variable "project_id" {
  description = "GCP project of the production mesh."
  type        = string
}

variable "hub" {
  description = "Region code of the leaf-node hub (topology.hub)."
  type        = string
}

variable "regions" {
  description = "Topology regions keyed by code (terraform.tfvars.json, rendered from the topology)."
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

variable "links" {
  description = "Topology links keyed by name (a-b): one VPC peering per link."
  type = map(object({
    a          = string
    b          = string
    one_way_ms = number
  }))
}

variable "networks" {
  description = "VPC self link per region code (outputs of the region module)."
  type        = map(string)
}

variable "node_addresses" {
  description = "Internal address per NATS node name (n0, n1, ...) per region code."
  type        = map(map(string))
}

variable "nodes_per_region" {
  description = "NATS servers per region; must match the region module's node_count."
  type        = number
}

variable "cluster_port" {
  description = "NATS route port inside a region."
  type        = number
}

variable "dns_domain" {
  description = "Private DNS domain shared by all regional VPCs."
  type        = string
  default     = "meridian.internal"
}
