"""The gateway kit: what the three gateways (identity, AI, fallback) share and no other deployable needs.

Not a deployable: `gateway_primary/` and `gateway_fallback/` are built from it. It may import `common/`;
`common/` never imports it.
"""
