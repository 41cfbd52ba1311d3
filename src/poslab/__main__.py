"""``python -m poslab``: the command line (see `poslab.lab.cli`)."""

from poslab.lab.cli import main

if __name__ == "__main__":  # not when multiprocessing re-imports it in a worker
    raise SystemExit(main())
