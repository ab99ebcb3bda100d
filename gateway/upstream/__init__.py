"""The only code that speaks HTTP to upstream APIs: pooled transports, timeouts, failure classes, rate limits."""
