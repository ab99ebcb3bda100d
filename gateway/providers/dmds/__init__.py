"""Planisys DMDS REST v1 provider: SMTP-API logins, campaigns, legs batched by reuse_eeid."""
