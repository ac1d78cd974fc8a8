# The auth service: the API-key pepper, and signing (never exporting) with the JWT transit key.
path "secret/data/dualgate/pepper" {
  capabilities = ["read"]
}
path "transit/sign/dualgate-jwt" {
  capabilities = ["update"]
}
path "transit/keys/dualgate-jwt" {
  capabilities = ["read"]
}
