"""Entry point of the single binary (PyInstaller runs this file, not a console script)."""

import sys

from edge_runtime.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
