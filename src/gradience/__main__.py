"""``python -m gradience`` runs the same CLI as the ``gradience`` console script."""

from gradience.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
