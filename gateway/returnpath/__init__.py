"""The return path: what happens after the 250 once the upstream has the message. Each account's event
poller reads the vendor's events back into the ledger (poller.py) and DMDS' invalid contacts into the
suppression list (contacts.py); delivery status notices go to senders through the delivery owner
(notices.py); webhooks are told of events from the shared outbox (webhooks.py); service.py runs them."""
