"""smtp-gateway: authenticated SMTP in, email-platform HTTP API calls out."""

__version__ = "0.1.0"
