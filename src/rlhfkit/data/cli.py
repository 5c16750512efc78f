"""`rlhfkit data`: list, fetch and look at the offline data sources and named models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhfkit.data import sources
from rlhfkit.errors import DataError
from rlhfkit.models import zoo


def _entry(name: str, what: str, pkg: sources.Package, state: str, where: Path) -> None:
    print(f"{name:<11} {what}\n{'':<11} {pkg.name}=={pkg.version}, licence {pkg.licence}, {state} ({where})")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="named sources and models, what they hold, licence, and whether they are here")
    f = sub.add_parser("fetch", help="download a named source or model into the cache now (SHA-256 checked)")
    f.add_argument("name", choices=[*sources.SOURCE_HELP, *zoo.NAMED_MODELS])
    s = sub.add_parser("show", help="print the first records of any source spec, or what a named model is")
    s.add_argument("spec", help="vader[:domains], chatterbot, a .txt/.jsonl file, hf:<dataset>, or a model: "
                                f"{', '.join(zoo.NAMED_MODELS)}")
    s.add_argument("-n", type=int, default=5, help="how many records to print")
    s.add_argument("--pairs", action="store_true", help="show prompt/response pairs instead of texts")
    a = p.parse_args(argv)

    if a.cmd == "list":
        for name, desc in sources.SOURCE_HELP.items():
            where = sources.data_dir() / name
            state = "cached" if (where / "SOURCE.json").exists() else "not fetched yet"
            _entry(name, desc, sources.PACKAGES[name], state, where)
        for name, model in zoo.NAMED_MODELS.items():
            found = zoo.find_model(name)
            state = ("not fetched yet" if found is None else
                     "cached" if found == zoo.model_dir(name) else "installed package")
            _entry(name, model.help, sources.PACKAGES[model.package], state, found or zoo.model_dir(name))
        print("\nAlso: any .txt (one document per line) / .jsonl / .json file, and hf:<dataset>[:<config>]"
              "[@<split>] when `datasets` is installed; any HF model directory as a model.")
    elif a.cmd == "fetch":
        if a.name == "vader":
            items = sources.vader_items()
            print(f"vader: {len(items)} snippets, {sum(len(i.ratings) for i in items)} human ratings")
            print(f"cached in {sources.data_dir() / a.name}")
        elif a.name == "chatterbot":
            print(f"chatterbot: {len(sources.chatterbot_pairs())} prompt/response pairs")
            print(f"cached in {sources.data_dir() / a.name}")
        else:
            path = zoo.resolve_model(a.name)
            print(f"{a.name}: {zoo.NAMED_MODELS[a.name].help}")
            print(f"model in {path}")
    elif a.cmd == "show":
        if a.spec in zoo.NAMED_MODELS:
            if a.pairs:
                raise DataError(f"{a.spec} is a model, not a data source: it has no prompt/response pairs")
            print(json.dumps(zoo.describe(a.spec), indent=1))
        elif a.pairs:
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
