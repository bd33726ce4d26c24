"""The project's round messages as Flower records, and back.

A client's upload (:class:`~recbole_feddmmr.federated.messages.ClientResult`) travels as one ``ArrayRecord``
of its tensors (the item tables' changed rows only, ``[k, D]``, with their row indices: never a whole item
table) and one ``MetricRecord`` of its scalars, under keys that carry its client id, so a SuperNode hosting
many clients answers with one message that keeps every client's upload apart (robust rules and the
prototype merge need them apart).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import Tensor

from recbole_feddmmr.federated.messages import ClientResult

ROWS = "rows:"  # ArrayRecord key prefix of an item table's changed-row indices
ROW_WEIGHTS = "row_weights:"  # ... of secure aggregation's dense row counts
UPDATE = "update:"


def tensors_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    """Named tensors -> an ArrayRecord (the bytes Flower sends; CPU tensors)."""
    return ArrayRecord(torch_state_dict={name: value.detach().cpu() for name, value in tensors.items()})


def record_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """An ArrayRecord -> named tensors."""
    return dict(record.to_torch_state_dict())


def add_client_result(content: RecordDict, result: ClientResult) -> None:
    """Put one client's upload into a reply's ``content`` under keys of its client id."""
    tensors = {f"{UPDATE}{name}": value for name, value in result.update.items()}
    tensors |= {f"{ROWS}{name}": value for name, value in result.changed_rows.items()}
    tensors |= {f"{ROW_WEIGHTS}{name}": value for name, value in result.row_weights.items()}
    tensors |= {"prototypes": result.prototypes, "prototype_counts": result.prototype_counts}
    content[f"upload.{result.client_id}"] = tensors_record(tensors)
    content[f"result.{result.client_id}"] = MetricRecord(
        {
            "num_samples": result.num_samples,
            "mean_loss": float(result.mean_loss),
            "weight": -1.0 if result.weight is None else float(result.weight),
            "sum_ready": int(result.sum_ready),
        }
    )


def client_results(content: RecordDict) -> list[ClientResult]:
    """Every client's upload in a reply's ``content``, in client id order."""
    client_ids = sorted(int(key.split(".", 1)[1]) for key in content if key.startswith("result."))
    results = []
    for client_id in client_ids:
        scalars = content[f"result.{client_id}"]
        tensors = record_tensors(content[f"upload.{client_id}"])

        def with_prefix(prefix: str, tensors: dict[str, Tensor] = tensors) -> dict[str, Tensor]:
            return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}

        results.append(
            ClientResult(
                update=with_prefix(UPDATE),
                num_samples=int(scalars["num_samples"]),
                prototypes=tensors["prototypes"],
                prototype_counts=tensors["prototype_counts"],
                mean_loss=float(scalars["mean_loss"]),
                client_id=client_id,
                changed_rows=with_prefix(ROWS),
                weight=None if scalars["weight"] < 0 else float(scalars["weight"]),
                sum_ready=bool(scalars["sum_ready"]),
                row_weights=with_prefix(ROW_WEIGHTS),
            )
        )
    return results
