# The users service: short-lived credentials for its own database only, and giving back its own leases
# (after its pool moved to new credentials). Renewing a known lease comes with Vault's default policy.
path "database/creds/dualgate-users" {
  capabilities = ["read"]
}
path "sys/leases/revoke" {
  capabilities = ["update"]
  allowed_parameters = {
    "lease_id" = ["database/creds/dualgate-users/*"]
  }
}
