"""Who may log in: configured users and provider logins (credentials.py), and their password hashes
(passwords.py)."""
