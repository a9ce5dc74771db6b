"""``python -m altsearch``. The guard matters: decode workers are spawned processes that re-import the
parent's ``__main__`` module, and must not run the CLI themselves."""

from .cli import main

if __name__ == "__main__":
    main()
