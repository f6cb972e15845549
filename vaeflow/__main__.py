"""``python -m vaeflow`` is the ``vaeflow`` command."""

from vaeflow.cli import main

if __name__ == "__main__":
    main()
