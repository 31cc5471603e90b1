"""``python -m functrain run CONFIG [override ...]``: the ``functrain`` command.

The command is `functrain.config.cli`.
"""

from functrain.config.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
