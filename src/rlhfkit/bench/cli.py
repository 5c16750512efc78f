"""`rlhfkit bench <name>`: benchmarks. Each one prints its own table and writes a JSON-lines file."""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "trl-peer": ("our GRPO, RLOO and PPO beside TRL's on TRL's fixed CPU workload, measured in one run",
                 "rlhfkit.bench.trl_peer:main"),
    "peers": ("our GRPO and RLOO beside TRL's on a real model (SmolLM2-135M), full and LoRA, one command",
              "rlhfkit.bench.peers.run:main"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print("usage: rlhfkit bench <name> [--help]\n\nbenchmarks:")
        for name, (helptext, _) in BENCHES.items():
            print(f"  {name:10s} {helptext}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _, fn = BENCHES[argv[0]][1].partition(":")
    return int(getattr(importlib.import_module(module), fn)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
