"""Looking inside a trained model: a user's top items, and one user's LocalDynamicMemory as a table."""

from __future__ import annotations

import pandas as pd
from recbole.utils.case_study import full_sort_topk

from recbole_feddmmr.errors import ConfigError


def _user_id(dataset, user: str | int) -> int:
    return int(user) if isinstance(user, int) else int(dataset.token2id(dataset.uid_field, str(user)))


def _titles(dataset, item_ids) -> list[str] | None:
    """The items' titles, when the .item file has a title column."""
    title_field = next((f for f in ("movie_title", "title", "name") if f in dataset.field2source), None)
    if title_field is None or dataset.item_feat is None:
        return None
    titles = dataset.item_feat[title_field][item_ids]  # token sequences -> words
    return [" ".join(dataset.id2token(title_field, row[row > 0])) for row in titles.numpy()]


def top_items(model, eval_data, user: str | int, k: int = 10) -> pd.DataFrame:
    """The ``k`` items ``model`` ranks first for ``user`` at its prediction point in ``eval_data`` (e.g. the
    test split of :func:`recbole_feddmmr.load_checkpoint`), as RecBole's evaluator ranks them: item token,
    title (if any) and score."""
    dataset = eval_data._dataset
    device = next(model.parameters()).device
    scores, item_ids = full_sort_topk([_user_id(dataset, user)], model, eval_data, k, device)  # [1, k] each
    item_ids = item_ids[0].cpu()
    table = pd.DataFrame({"item": dataset.id2token(dataset.iid_field, item_ids), "score": scores[0].cpu().numpy()})
    titles = _titles(dataset, item_ids)
    if titles is not None:
        table.insert(1, "title", titles)
    return table


def memory_table(model, dataset, user: str | int) -> pd.DataFrame:
    """One user's memory, highest utility first: item token, title (if the .item file has one), utility, ...

    ``user`` is the user's token as in the .inter file (e.g. ``"196"``) or RecBole's internal id (int).
    """
    memory = getattr(model, "memory", None)
    if not hasattr(memory, "user_table"):
        raise ConfigError(f"{type(model).__name__} has no LocalDynamicMemory (set memory_type=dynamic)")
    columns = {name: values.cpu().numpy() for name, values in memory.user_table(_user_id(dataset, user)).items()}
    item_ids = columns.pop("item_id")
    table = pd.DataFrame({"item": dataset.id2token(dataset.iid_field, item_ids), **columns})
    titles = _titles(dataset, item_ids)
    if titles is not None:
        table.insert(1, "title", titles)
    return table
