"""The SMTP edge: the only package that imports aiosmtpd."""
