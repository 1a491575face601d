# Pure module: no providers, so it can be evaluated offline (tests/test_terraform.py does).
terraform {
  required_version = ">= 1.9.0, < 2.0.0"
}
