"""What every benchmark prints beside its figures: the CPU changes between sessions."""

from __future__ import annotations

import subprocess


def cpu_description() -> str:
    """lscpu's model name and flags: the figures depend on the vector units."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}; flags: {fields.get('Flags', '?').strip()}"
