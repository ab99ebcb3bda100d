"""dEngage transactional email provider: API-user token, per-recipient calls, From identities."""
