# Every process that logs in to Vault: read the internal service-token keys (all versions verify,
# `current` signs) and the operator's rotation requests. Token self-renewal comes with Vault's
# default policy.
path "secret/data/dualgate/internal" {
  capabilities = ["read"]
}
path "secret/data/dualgate/rotation" {
  capabilities = ["read"]
}
