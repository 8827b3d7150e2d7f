"""The first N fresh/rotten reviews of the Rotten Tomatoes corpus as a CSV
(review,sentiment): the review sets of pipelines/bench-fit.sh and
pipelines/bench-mpnet.sh.

    python3 benches/rt_reviews.py rotten_tomatoes_corpus_full.csv.bz2 OUT.csv N
"""

import bz2
import csv
import sys

src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [r for r in csv.DictReader(bz2.open(src, "rt")) if r["category"] in ("fresh", "rotten")]
if len(rows) < n:
    sys.exit(f"only {len(rows)} reviews")
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["review", "sentiment"])
    for r in rows[:n]:
        w.writerow([r["text"], r["category"]])
