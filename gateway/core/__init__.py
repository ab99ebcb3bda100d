"""The value types and tables every layer shares (model, errors, replies, outcomes): below delivery,
providers and the queue, and importing nothing else of the gateway."""
