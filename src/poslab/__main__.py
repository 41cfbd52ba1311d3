"""``python -m poslab``: the command line (see `poslab.cli`)."""

from poslab.cli import main

if __name__ == "__main__":  # not when multiprocessing re-imports it in a worker
    raise SystemExit(main())
