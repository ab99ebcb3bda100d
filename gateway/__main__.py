"""`python -m gateway` is `smtp-gateway`."""

from gateway.cli import main

raise SystemExit(main())
