"""Rebuild data/cranfield-demo from the full BEIR-format Cranfield folder (../shared/data/cranfield).

Deterministic: the first 30 judged queries, every document judged for them, and every 7th other
document (by id order) until the corpus has 300 documents. Run: python data/build_cranfield_demo.py [SRC] [DST]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QUERIES = 30
DOCUMENTS = 300


def main(src: Path, dst: Path) -> None:
    queries = [json.loads(line) for line in (src / "queries.jsonl").open(encoding="utf-8")][:QUERIES]
    keep_q = {q["_id"] for q in queries}
    rows = [line.rstrip("\n").split("\t") for line in (src / "qrels" / "test.tsv").open(encoding="utf-8")]
    header, qrels = rows[0], [r for r in rows[1:] if r[0] in keep_q]
    judged = {r[1] for r in qrels}
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").open(encoding="utf-8")]
    others = [d["_id"] for d in corpus if d["_id"] not in judged][::7]
    keep_d = judged | set(others[: DOCUMENTS - len(judged)])
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    with (dst / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for d in corpus:
            if d["_id"] in keep_d:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with (dst / "queries.jsonl").open("w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    with (dst / "qrels" / "test.tsv").open("w", encoding="utf-8") as f:
        for r in [header, *qrels]:
            f.write("\t".join(r) + "\n")
    print(f"{len(keep_d)} documents, {len(queries)} queries, {len(qrels)} judgments -> {dst}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parents[1] / "shared" / "data" / "cranfield"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "cranfield-demo"
    main(src, dst)
