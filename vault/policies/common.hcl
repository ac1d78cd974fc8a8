# Every service: the internal service-token keys (read only).
path "secret/data/dualgate/internal" {
  capabilities = ["read"]
}
