"""What a cluster at rest looks like in its report (megakv.distkv.cluster_engine.ClusterEngine.cluster_report)."""
from __future__ import annotations

from collections import Counter


def assert_settled(report: dict, ledger_kept: dict[str, int] | None = None) -> None:
    """No block is owed but kept loans (blocks a debtor keeps for their cached prefix while none of its requests
    holds them), and each live instance's pool is free but for the kept loans it lends. ``ledger_kept``: the kept
    loans taken with the report, where the report's ledger was read at another moment."""
    kept = report["ledger_kept"] if ledger_kept is None else ledger_kept
    assert report["ledger_outstanding"] == kept, f"blocks owed beyond the kept loans {kept}"
    lent = Counter()
    for pair, num_blocks in kept.items():
        lent[pair.split("->")[1]] += num_blocks
    assert {instance: free + lent[instance] for instance, free in report["free_blocks"].items()} == \
        dict.fromkeys(report["free_blocks"], report["blocks_per_instance"]), f"pools not whole: {report}"
