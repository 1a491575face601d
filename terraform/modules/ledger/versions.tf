terraform {
  required_version = ">= 1.9.0, < 2.0.0"

  required_providers {
    cockroach = {
      source  = "cockroachdb/cockroach"
      version = "1.12.2"
    }
    google = {
      source  = "hashicorp/google"
      version = "6.30.0"
    }
  }
}
