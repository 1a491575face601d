# One Prometheus per region. Each scrapes its own region's NATS nodes (exporter) and workers,
# and also probes the other regions' NATS exporters (job nats_remote, label `vantage`): a region
# cannot report its own death, and those probes cross the WAN exactly like the leaf links do.
# Alert and recording rules are the repo's ops/prometheus files, loaded verbatim, so the local
# stack and production alert on the same expressions.

locals {
  prefix = "meridian"
  labels = merge(var.labels, { app = "meridian", component = "prometheus" })

  rules = { for f in var.rule_files : basename(f) => file(f) }

  exporter_targets = {
    for code, nodes in var.node_addresses : code => [
      for name, ip in nodes : "${ip}:${var.exporter_port}"
    ]
  }

  worker_targets = {
    for code, nodes in var.node_addresses : code => flatten([
      for name, ip in nodes : [
        for i in range(var.workers_per_node) : "${ip}:${var.regions[code].metrics_port_base + i}"
      ]
    ])
  }

  prometheus_config = {
    for code, r in var.regions : code => yamlencode({
      global = {
        scrape_interval     = var.scrape_interval
        evaluation_interval = var.scrape_interval
        external_labels     = { region = code, env = "production" }
      }
      rule_files = [for name in keys(local.rules) : "/etc/prometheus/rules/${name}"]
      scrape_configs = [
        {
          job_name       = "meridian-nats"
          static_configs = [{ targets = local.exporter_targets[code], labels = { region = code } }]
        },
        {
          # not "meridian-*": every node is scraped on every worker port, but the single-writer
          # workers run on one node per region, so MeridianTargetDown would fire for good
          job_name       = "workers"
          static_configs = [{ targets = local.worker_targets[code], labels = { region = code } }]
        },
        {
          job_name = "meridian-nats-remote"
          static_configs = [
            for other, targets in local.exporter_targets : {
              targets = targets
              labels  = { region = other, vantage = code }
            } if other != code
          ]
        },
      ]
    })
  }
}

resource "google_service_account" "prometheus" {
  project      = var.project_id
  account_id   = "${local.prefix}-prometheus"
  display_name = "Meridian Prometheus"
}

resource "google_compute_instance" "prometheus" {
  for_each = var.regions

  project      = var.project_id
  name         = "${local.prefix}-${each.key}-prometheus"
  zone         = "${each.value.cloud_region}-a"
  machine_type = var.machine_type
  labels       = merge(local.labels, { region = each.key })
  # Scrapes from inside the region's range, which the region's monitoring firewall admits.

  boot_disk {
    initialize_params {
      image = "debian-cloud/debian-12"
      size  = 200
      type  = "pd-ssd"
    }
  }

  network_interface {
    subnetwork = var.subnets[each.key]
  }

  service_account {
    email  = google_service_account.prometheus.email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot = true
    enable_vtpm        = true
  }

  metadata = merge(
    {
      block-project-ssh-keys = "true"
      enable-oslogin         = "TRUE"
      prometheus-yml         = local.prometheus_config[each.key]
      startup-script = templatefile("${path.module}/templates/startup.sh.tftpl", {
        rule_names = keys(local.rules)
        retention  = var.retention
      })
    },
    { for name, text in local.rules : "rules-${replace(name, ".", "-")}" => text },
  )
}
