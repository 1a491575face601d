# Renders one nats-server configuration per region from the topology, mirroring the local mesh
# (regions/natsconf.py): same ports, JetStream domain = region code, same keepalives, leaf links
# exactly as the topology says (hub accepts; spokes dial leaf_dial in order, no_randomize).
# Differences from the local mesh, all production-only: 3-node cluster per region, TLS on every
# listener, leaf links authenticated by mutual TLS, accounts included from a Secret Manager file.

locals {
  # Each acceptor is reached by one DNS name resolving to all its nodes.
  leaf_url = {
    for code, r in var.regions : code => "nats-leaf://leaf.${code}.${var.dns_domain}:${r.leaf_port}"
  }

  routes = {
    for code, r in var.regions : code => [
      for i in range(var.nodes_per_region) : "nats-route://n${i}.${code}.${var.dns_domain}:${var.cluster_port}"
    ]
  }

  leaf_remotes = {
    for code, r in var.regions : code => [for t in r.leaf_dial : local.leaf_url[t]]
  }

  # Same choice as the local mesh: a single-URL spoke re-links fast; a multi-URL spoke waits
  # long enough that a frozen hub is dropped before it dials the standby (loop detection).
  leaf_reconnect = {
    for code, r in var.regions : code => length(r.leaf_dial) > 1 ? "2s" : "250ms"
  }

  server_config = {
    for code, r in var.regions : code => templatefile("${path.module}/templates/nats-server.conf.tftpl", {
      code             = r.code
      name             = r.name
      domain           = r.domain
      client_port      = r.client_port
      leaf_port        = r.leaf_port
      monitor_port     = r.monitor_port
      cluster_port     = var.cluster_port
      accepts_leaf     = r.accepts_leaf
      leaf_remotes     = local.leaf_remotes[code]
      leaf_reconnect   = local.leaf_reconnect[code]
      routes           = local.routes[code]
      app_account      = var.app_account
      leaf_tls_subject = var.leaf_tls_subject
      tls_dir          = var.tls_dir
      accounts_include = var.accounts_include
      store_dir        = var.store_dir
    })
  }
}

check "hub_accepts_leaf_links" {
  assert {
    condition     = var.regions[var.hub].accepts_leaf
    error_message = "The hub region ${var.hub} must accept leaf links."
  }
}
