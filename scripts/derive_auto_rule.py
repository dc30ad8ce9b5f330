#!/usr/bin/env python3
"""Write convlora_kernels/auto_rule.json from committed benchmark results.

Usage: python scripts/derive_auto_rule.py benchmarks/results/*.json [-o convlora_kernels/auto_rule.json]

Each input is a document ``convlora-bench`` wrote (``--results DIR``). The rule picks, per GPU
architecture, dtype and rank, the fused backend with the faster forward+backward (see
convlora_kernels/auto_rule.py). Prints the rule; exit status 1 when no input had both fused
backends measured (nothing to decide from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convlora_kernels import auto_rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="benchmark JSON documents")
    parser.add_argument("-o", "--output", default=str(auto_rule.RULE_FILE))
    args = parser.parse_args(argv)
    documents = [json.loads(Path(p).read_text()) for p in args.results]
    rule = auto_rule.derive_rule(documents)
    text = json.dumps(rule, indent=1, sort_keys=True) + "\n"
    print(text, end="")
    if not rule["rules"]:
        print("no GPU document with both triton and cuda forward+backward rows: nothing written",
              file=sys.stderr)
        return 1
    Path(args.output).write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
