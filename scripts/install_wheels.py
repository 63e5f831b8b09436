"""Install the wheels brought to the GPU machine into a target directory, skipping what the image already has.

    python3 scripts/install_wheels.py .whl /tmp/site      # then: export PYTHONPATH=/tmp/site

A wheel is installed when its distribution is missing or older than the wheel, so the image's own packages (its
protobuf, requests, pydantic...) are not shadowed by copies that only the monitoring packages asked for.
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


def needed(wheel: Path) -> bool:
    name, version, _, _ = parse_wheel_filename(wheel.name)
    try:
        installed = Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return True
    return installed < version


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    wheels = sorted(Path(argv[0]).glob("*.whl"))
    todo = [w for w in wheels if needed(w)]
    skipped = sorted({canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels} -
                     {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in todo})
    print(f"installing {len(todo)} of {len(wheels)} wheels into {argv[1]}; already present: {', '.join(skipped)}")
    if not todo:
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", argv[1], *map(str, todo)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
