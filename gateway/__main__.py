"""`python -m gateway` is `smtp-gateway`."""

from gateway.entry import main

raise SystemExit(main())
