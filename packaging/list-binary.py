"""List the Python modules inside a PyInstaller one-file binary (its embedded PYZ archive).

Run with the build environment's Python (it has PyInstaller):
    .venv-build/bin/python packaging/list-binary.py dist/edgert [PREFIX]
"""

import sys

from PyInstaller.archive.readers import CArchiveReader


def modules(binary: str) -> list[str]:
    archive = CArchiveReader(binary)
    found: list[str] = []
    for name in archive.toc:
        if name.endswith(".pyz"):
            found += list(archive.open_embedded_archive(name).toc)
    return sorted(found)


if __name__ == "__main__":
    prefix = sys.argv[2] if len(sys.argv) > 2 else ""
    for m in modules(sys.argv[1]):
        if m.startswith(prefix):
            print(m)
