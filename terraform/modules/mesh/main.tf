# Leaf-node mesh between the regions (decision 0001, same as the local mesh):
#   hub (lon) accepts; nyc dials lon; sgp dials [lon, nyc] with no_randomize; nyc also accepts
#   (standby for sgp while the hub is down). Never a triangle: loop detection bans it.
# Links run over VPC peering (private addresses only), one peering per topology link, with TLS
# on every leaf link (mutual TLS; the acceptor maps the certificate subject to the account).

locals {
  leaf_tls_subject = "CN=leaf.${var.dns_domain}"
}

module "server_config" {
  source = "./modules/server-config"

  hub              = var.hub
  regions          = var.regions
  dns_domain       = var.dns_domain
  nodes_per_region = var.nodes_per_region
  cluster_port     = var.cluster_port
  leaf_tls_subject = local.leaf_tls_subject
}

# ---- private peering, one pair of peerings per topology link ----------------------------------

resource "google_compute_network_peering" "a_to_b" {
  for_each = var.links

  name                 = "meridian-${each.value.a}-to-${each.value.b}"
  network              = var.networks[each.value.a]
  peer_network         = var.networks[each.value.b]
  export_custom_routes = false
  import_custom_routes = false
}

resource "google_compute_network_peering" "b_to_a" {
  for_each = var.links

  name                 = "meridian-${each.value.b}-to-${each.value.a}"
  network              = var.networks[each.value.b]
  peer_network         = var.networks[each.value.a]
  export_custom_routes = false
  import_custom_routes = false

  # GCP rejects concurrent peering operations on the same network.
  depends_on = [google_compute_network_peering.a_to_b]
}

# ---- private DNS: n<i>.<code>, leaf.<code> and nats.<code> ------------------------------------

resource "google_dns_managed_zone" "mesh" {
  project     = var.project_id
  name        = "meridian-mesh"
  dns_name    = "${var.dns_domain}."
  description = "Meridian NATS mesh (private)"
  visibility  = "private"

  private_visibility_config {
    dynamic "networks" {
      for_each = var.networks
      content {
        network_url = networks.value
      }
    }
  }
}

resource "google_dns_record_set" "node" {
  for_each = merge([
    for code, nodes in var.node_addresses : {
      for name, ip in nodes : "${name}.${code}" => ip
    }
  ]...)

  project      = var.project_id
  managed_zone = google_dns_managed_zone.mesh.name
  name         = "${each.key}.${var.dns_domain}."
  type         = "A"
  ttl          = 60
  rrdatas      = [each.value]
}

# One name per accepting region, all of its nodes: a spoke's remote lists one URL per region.
resource "google_dns_record_set" "leaf" {
  for_each = { for code, r in var.regions : code => r if r.accepts_leaf }

  project      = var.project_id
  managed_zone = google_dns_managed_zone.mesh.name
  name         = "leaf.${each.key}.${var.dns_domain}."
  type         = "A"
  ttl          = 30
  rrdatas      = values(var.node_addresses[each.key])
}

resource "google_dns_record_set" "client" {
  for_each = var.regions

  project      = var.project_id
  managed_zone = google_dns_managed_zone.mesh.name
  name         = "nats.${each.key}.${var.dns_domain}."
  type         = "A"
  ttl          = 30
  rrdatas      = values(var.node_addresses[each.key])
}

check "every_dial_has_a_link" {
  assert {
    condition = alltrue(flatten([
      for code, r in var.regions : [
        for t in r.leaf_dial : anytrue([
          for l in values(var.links) : toset([l.a, l.b]) == toset([code, t])
        ])
      ]
    ]))
    error_message = "Every leaf_dial entry needs a link (and so a VPC peering) between the two regions."
  }
}
