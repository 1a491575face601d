terraform {
  required_version = ">= 1.9.0, < 2.0.0"

  # Exact pins; `terraform init` writes .terraform.lock.hcl, which is committed with the hashes.
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "6.30.0"
    }
    cockroach = {
      source  = "cockroachdb/cockroach"
      version = "1.12.2"
    }
  }

  # Remote state: a GCS bucket with versioning, uniform access and a CMEK key, in a separate
  # "meridian-admin" project. Only the bucket name is given here; everything else comes from
  # `terraform init -backend-config=...` (see terraform/README.md) so no project ids, keys or
  # credentials are committed. State holds the Redis AUTH strings: treat the bucket as secret.
  backend "gcs" {
    prefix = "meridian/production"
    # bucket              = "<from -backend-config=backend.hcl>"
    # kms_encryption_key  = "<from -backend-config=backend.hcl>"
    # impersonate_service_account = "<from -backend-config=backend.hcl>"
  }
}

provider "google" {
  project = var.project_id
  # Credentials: Application Default Credentials / workload identity of the CI runner.
}

provider "cockroach" {
  # Credentials: COCKROACH_API_KEY in the environment (a CI secret), never a variable.
}
