"""Regenerate tests/test_data/tiny/ (deterministic): python tests/test_data/make_tiny.py

12 users x 8-12 interactions over 30 items; every item has an 8-d text
feature, items 1-25 a 6-d visual feature and items 26-30 none (empty cell).
"""

from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "tiny"
rng = np.random.default_rng(7)
OUT.mkdir(exist_ok=True)

rows = []
for user in range(1, 13):
    items = rng.choice(np.arange(1, 31), size=rng.integers(8, 13), replace=False)
    for step, item in enumerate(items):
        rows.append(f"{user}\t{item}\t{rng.integers(1, 6)}\t{1000 * user + 10 * step}")
(OUT / "tiny.inter").write_text(
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(rows) + "\n"
)

genres = ["Action", "Comedy", "Drama", "Horror"]
items = [f"{i}\tMovie {i}\t{1990 + i % 10}\t{genres[i % 4]} {genres[(i + 1) % 4]}" for i in range(1, 31)]
(OUT / "tiny.item").write_text(
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "\n".join(items) + "\n"
)

emb = ["iid:token\tsbert_emb:float_seq\tclip_emb:float_seq"]
for i in reversed(range(1, 31)):  # reversed: row order must not matter
    text = " ".join(f"{v:.5f}" for v in rng.normal(size=8))
    visual = " ".join(f"{v:.5f}" for v in rng.normal(size=6)) if i <= 25 else ""
    emb.append(f"{i}\t{text}\t{visual}")
(OUT / "tiny.itememb").write_text("\n".join(emb) + "\n")
