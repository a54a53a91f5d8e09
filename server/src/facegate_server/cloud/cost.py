"""What the cloud costs: every Face API call is a billable transaction (detect, identify,
person create, add face, train, training-status polls, gets, lists, deletions), counted by
operation (cloud/azure.py's TransactionCounter), priced per tier.

Defaults and their sources (read 2026-12-01; prices are settings because they change):
- rates: "Azure Face service quotas and limits", Microsoft Learn
  (https://learn.microsoft.com/azure/ai-services/computer-vision/identity-quotas-limits):
  F0 20 transactions a minute, S0 10 a second;
- F0: 30,000 free transactions a month, 1,000 persons per group; calls beyond the quota
  are refused (403), not billed;
- S0: no free allowance; $1 per 1,000 transactions (the first million a month) and $0.01
  per 1,000 stored faces a month — the Azure AI Face pricing page
  (https://azure.microsoft.com/pricing/details/cognitive-services/face-api/), as quoted in
  FaceGate's issue 11 (2026-11); not re-read from the page here: check it before you budget.
Storage counts every persisted face: each enrolled photo is one (not one per member).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PriceModel:
    tier: str = "S0"
    per_1000: float = 1.0
    """S0: USD per 1,000 transactions."""
    storage_per_1000_faces: float = 0.01
    """S0: USD per 1,000 stored faces a month."""
    free_transactions: int = 30_000
    """F0: transactions a month before the resource refuses calls."""

    def transactions_cost(self, transactions: int) -> float:
        """USD for `transactions` (F0: free, within its quota)."""
        if self.tier == "F0":
            return 0.0
        return transactions * self.per_1000 / 1000

    def monthly(self, transactions: int, stored_faces: int) -> float:
        """USD a month for `transactions` a month and `stored_faces` kept all month."""
        if self.tier == "F0":
            return 0.0
        return self.transactions_cost(transactions) + (
            stored_faces * self.storage_per_1000_faces / 1000
        )

    def over_quota(self, transactions: int) -> bool:
        """F0: more transactions than a month allows (the rest would be refused)."""
        return self.tier == "F0" and transactions > self.free_transactions

    def describe(self, counts: Mapping[str, int]) -> str:
        """`facegate status`'s line: the transactions so far, priced."""
        total = sum(counts.values())
        if self.tier == "F0":
            return f"F0: {total} of {self.free_transactions} free transactions a month"
        return f"S0: {total} transactions, ${self.transactions_cost(total):.2f}"
