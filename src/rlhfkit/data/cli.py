"""`rlhfkit data`: list, fetch and look at the offline data sources."""
from __future__ import annotations

import argparse
import json

from rlhfkit.data import sources


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="named sources, what they hold, licence, and whether they are cached")
    f = sub.add_parser("fetch", help="download a named source into the cache now (SHA-256 checked)")
    f.add_argument("name", choices=sorted(sources.PACKAGES))
    s = sub.add_parser("show", help="print the first records of any source spec")
    s.add_argument("spec", help="vader[:domains], chatterbot, a .txt/.jsonl file, or hf:<dataset>")
    s.add_argument("-n", type=int, default=5, help="how many records to print")
    s.add_argument("--pairs", action="store_true", help="show prompt/response pairs instead of texts")
    a = p.parse_args(argv)

    if a.cmd == "list":
        for name, desc in sources.SOURCE_HELP.items():
            pkg = sources.PACKAGES[name]
            cached = (sources.data_dir() / name / "SOURCE.json").exists()
            print(f"{name:<11} {desc}\n{'':<11} {pkg.name}=={pkg.version}, licence {pkg.licence}, "
                  f"{'cached' if cached else 'not cached yet'} ({sources.data_dir() / name})")
        print("\nAlso: any .txt (one document per line) / .jsonl / .json file, and hf:<dataset>[:<config>]"
              "[@<split>] when `datasets` is installed.")
    elif a.cmd == "fetch":
        if a.name == "vader":
            items = sources.vader_items()
            print(f"vader: {len(items)} snippets, {sum(len(i.ratings) for i in items)} human ratings")
        else:
            print(f"chatterbot: {len(sources.chatterbot_pairs())} prompt/response pairs")
        print(f"cached in {sources.data_dir() / a.name}")
    elif a.cmd == "show":
        if a.pairs:
            for r in sources.load_pairs(a.spec, max_examples=a.n):
                print(json.dumps(r, ensure_ascii=False))
        elif a.spec.startswith("vader") and not a.spec.endswith((".txt", ".jsonl", ".json")):
            _, _, dom = a.spec.partition(":")
            for it in sources.vader_items(dom.split(",") if dom else None)[:a.n]:
                print(json.dumps({"id": it.id, "mean": round(it.mean, 3), "n_ratings": len(it.ratings),
                                  "text": it.text}, ensure_ascii=False))
        else:
            for t in sources.load_texts(a.spec, max_docs=a.n):
                print(t)
    return 0
