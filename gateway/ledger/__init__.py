"""The message ledger: a record of every message answered 250 (recipients' states, a timeline of events),
stored beside the queue, written off the SMTP path in batches, read by `smtp-gateway status` and the API."""
