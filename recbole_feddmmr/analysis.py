"""Looking inside a trained model: one user's LocalDynamicMemory as a table."""

from __future__ import annotations

import pandas as pd


def memory_table(model, dataset, user: str | int) -> pd.DataFrame:
    """One user's memory, highest utility first: item token, title (if the .item file has one), utility, ...

    ``user`` is the user's token as in the .inter file (e.g. ``"196"``) or RecBole's internal id (int).
    """
    memory = getattr(model, "memory", None)
    if not hasattr(memory, "user_table"):
        raise ValueError(f"{type(model).__name__} has no LocalDynamicMemory (set memory_type=dynamic)")
    uid = int(user) if isinstance(user, int) else int(dataset.token2id(dataset.uid_field, str(user)))
    columns = {name: values.cpu().numpy() for name, values in memory.user_table(uid).items()}
    item_ids = columns.pop("item_id")
    table = pd.DataFrame({"item": dataset.id2token(dataset.iid_field, item_ids), **columns})
    title_field = next((f for f in ("movie_title", "title", "name") if f in dataset.field2source), None)
    if title_field is not None and dataset.item_feat is not None:
        titles = dataset.item_feat[title_field][item_ids]  # token sequences -> words
        table.insert(1, "title", [" ".join(dataset.id2token(title_field, row[row > 0])) for row in titles.numpy()])
    return table
