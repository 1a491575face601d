# One Meridian region: its own VPC and subnet, firewall rules that open only the NATS client,
# leaf-node and monitoring ports to the regions' address ranges (routes only inside the region),
# a 3-node JetStream cluster on Compute Engine instances (one per zone, static internal address,
# pd-ssd data disk), and a Memorystore for Redis instance (HA, TLS, AUTH).

data "google_compute_zones" "available" {
  project = var.project_id
  region  = var.cloud_region
  status  = "UP"
}

locals {
  prefix     = "meridian-${var.code}"
  nats_tag   = "${local.prefix}-nats"
  all_cidrs  = concat([var.subnet_cidr], values(var.peer_cidrs))
  node_names = [for i in range(var.node_count) : "n${i}"]
  zones      = data.google_compute_zones.available.names
  labels     = merge(var.labels, { app = "meridian", region = var.code })

  metrics_ports = "${var.metrics_port_base}-${var.metrics_port_base + var.workers_per_node - 1}"
}

# ---- network ---------------------------------------------------------------------------------

resource "google_compute_network" "this" {
  project                 = var.project_id
  name                    = local.prefix
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"
}

resource "google_compute_subnetwork" "this" {
  project                  = var.project_id
  name                     = local.prefix
  region                   = var.cloud_region
  network                  = google_compute_network.this.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true # Secret Manager and package mirrors without public IPs

  log_config {
    aggregation_interval = "INTERVAL_1_MIN"
    flow_sampling        = 0.1
  }
}

# Egress only (release downloads, OS updates); nothing is reachable from the internet.
resource "google_compute_router" "this" {
  project = var.project_id
  name    = local.prefix
  region  = var.cloud_region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  project                            = var.project_id
  name                               = local.prefix
  router                             = google_compute_router.this.name
  region                             = var.cloud_region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"
}

# ---- firewall: GCP denies all other ingress by default ---------------------------------------

resource "google_compute_firewall" "nats_client" {
  project       = var.project_id
  name          = "${local.prefix}-nats-client"
  network       = google_compute_network.this.id
  description   = "NATS clients of every region (failover order crosses regions)."
  direction     = "INGRESS"
  source_ranges = local.all_cidrs
  target_tags   = [local.nats_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.client_port)]
  }
}

resource "google_compute_firewall" "nats_leaf" {
  count = var.accepts_leaf ? 1 : 0

  project       = var.project_id
  name          = "${local.prefix}-nats-leaf"
  network       = google_compute_network.this.id
  description   = "Leaf-node links from the other regions (mutual TLS)."
  direction     = "INGRESS"
  source_ranges = values(var.peer_cidrs)
  target_tags   = [local.nats_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.leaf_port)]
  }
}

resource "google_compute_firewall" "monitoring" {
  project       = var.project_id
  name          = "${local.prefix}-monitoring"
  network       = google_compute_network.this.id
  description   = "NATS monitoring, exporter and worker metrics for every region's Prometheus."
  direction     = "INGRESS"
  source_ranges = local.all_cidrs
  target_tags   = [local.nats_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.monitor_port), tostring(var.exporter_port), local.metrics_ports]
  }
}

resource "google_compute_firewall" "nats_routes" {
  project       = var.project_id
  name          = "${local.prefix}-nats-routes"
  network       = google_compute_network.this.id
  description   = "JetStream cluster routes, inside this region only."
  direction     = "INGRESS"
  source_ranges = [var.subnet_cidr]
  target_tags   = [local.nats_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.cluster_port)]
  }
}

# ---- identity: the nodes read exactly their secrets --------------------------------------------

resource "google_service_account" "nats" {
  project      = var.project_id
  account_id   = "${local.prefix}-nats"
  display_name = "Meridian NATS nodes (${var.name})"
}

resource "google_secret_manager_secret_iam_member" "nats" {
  for_each = tomap(var.secret_ids) # for_each takes maps, not objects

  project   = var.project_id
  secret_id = each.value
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.nats.email}"
}

resource "google_project_iam_member" "nats_logging" {
  for_each = toset(["roles/logging.logWriter", "roles/monitoring.metricWriter"])

  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.nats.email}"
}

# ---- NATS nodes -------------------------------------------------------------------------------

resource "google_compute_address" "nats" {
  for_each = toset(local.node_names)

  project      = var.project_id
  name         = "${local.prefix}-${each.key}"
  region       = var.cloud_region
  subnetwork   = google_compute_subnetwork.this.id
  address_type = "INTERNAL"
}

resource "google_compute_disk" "jetstream" {
  for_each = toset(local.node_names)

  project = var.project_id
  name    = "${local.prefix}-${each.key}-jetstream"
  zone    = local.zones[index(local.node_names, each.key) % length(local.zones)]
  type    = "pd-ssd"
  size    = var.data_disk_gb
  labels  = local.labels

  lifecycle {
    prevent_destroy = true # the JetStream store: losing it is losing acknowledged messages
  }
}

resource "google_compute_instance" "nats" {
  for_each = toset(local.node_names)

  project      = var.project_id
  name         = "${local.prefix}-${each.key}"
  zone         = google_compute_disk.jetstream[each.key].zone
  machine_type = var.machine_type
  tags         = [local.nats_tag]
  labels       = local.labels

  boot_disk {
    initialize_params {
      image = var.image
      size  = 50
      type  = "pd-balanced"
    }
  }

  attached_disk {
    source      = google_compute_disk.jetstream[each.key].id
    device_name = "jetstream"
  }

  network_interface {
    subnetwork = google_compute_subnetwork.this.id
    network_ip = google_compute_address.nats[each.key].address
    # no access_config: no public address
  }

  service_account {
    email  = google_service_account.nats.email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    block-project-ssh-keys = "true"
    enable-oslogin         = "TRUE"
    nats-server-conf       = var.nats_server_config
    startup-script = templatefile("${path.module}/templates/startup.sh.tftpl", {
      server_name         = "${var.code}-${each.key}"
      nats_server_version = var.nats_server_version
      nats_server_sha256  = var.nats_server_sha256
      exporter_port       = var.exporter_port
      nats_exporter_url   = var.nats_exporter_url
      monitor_port        = var.monitor_port
      secret_ids          = var.secret_ids
    })
  }

  allow_stopping_for_update = true

  depends_on = [google_secret_manager_secret_iam_member.nats]
}

# ---- Redis (risk token buckets, session state) ---------------------------------------------------

resource "google_redis_instance" "this" {
  project                 = var.project_id
  name                    = local.prefix
  region                  = var.cloud_region
  tier                    = "STANDARD_HA"
  memory_size_gb          = var.redis_memory_size_gb
  redis_version           = var.redis_version
  authorized_network      = google_compute_network.this.id
  connect_mode            = "DIRECT_PEERING"
  auth_enabled            = true                    # AUTH string is generated by Google, never a variable
  transit_encryption_mode = "SERVER_AUTHENTICATION" # TLS
  labels                  = local.labels

  maintenance_policy {
    weekly_maintenance_window {
      day = "SATURDAY" # FX markets are closed
      start_time {
        hours   = 6
        minutes = 0
      }
    }
  }
}
