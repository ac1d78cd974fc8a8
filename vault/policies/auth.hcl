# The auth service: the API-key pepper (every version), signing with the JWT transit key (never
# exporting it), short-lived credentials for its own database, and giving back its own leases.
path "secret/data/dualgate/pepper" {
  capabilities = ["read"]
}
path "transit/sign/dualgate-jwt" {
  capabilities = ["update"]
}
path "transit/keys/dualgate-jwt" {
  capabilities = ["read"]
}
path "database/creds/dualgate-auth" {
  capabilities = ["read"]
}
path "sys/leases/revoke" {
  capabilities = ["update"]
  allowed_parameters = {
    "lease_id" = ["database/creds/dualgate-auth/*"]
  }
}
