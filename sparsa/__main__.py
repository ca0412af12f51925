"""`python -m sparsa ...` is the `sparsa` command."""

from sparsa.cli import main

raise SystemExit(main())
