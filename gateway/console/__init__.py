"""The operator console: server-rendered pages on the operator endpoint over the ledger, the queue and the
running configuration (docs/console.md)."""
