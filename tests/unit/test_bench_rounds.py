"""How the ingest bench orders its consumers over rounds and summarises them."""
from __future__ import annotations

import argparse

from bench.ingest import CONSUMERS, Rate, Round, round_order, summary


def test_every_consumer_goes_first_once_in_as_many_rounds_as_there_are_consumers() -> None:
    orders = [round_order(i, CONSUMERS) for i in range(len(CONSUMERS))]
    assert sorted(order[0] for order in orders) == sorted(CONSUMERS)
    assert sorted(order[-1] for order in orders) == sorted(CONSUMERS)
    assert all(sorted(order) == sorted(CONSUMERS) for order in orders)


def test_the_summary_reports_medians_under_the_usual_keys_and_the_spread_beside_them() -> None:
    def measured(worker: float, ceiling: float) -> Round:
        # events applied after the first reading / seconds = the rate
        return Round(CONSUMERS, {"worker": Rate(1000, 1000 / worker, 0, 1000 / worker),
                                 "ceiling": Rate(1000, 1000 / ceiling, 0, 1000 / ceiling),
                                 "baseline": Rate(1000, 1.0, 0, 1.0)}, applied_in_store=1000,
                     applied_per_process=[600, 400])

    args = argparse.Namespace(events=1000, users=10, items=10, partitions=4, processes=2)
    result = summary(args, [measured(4000, 1000), measured(3000, 2000), measured(1000, 250)],
                     items=10, batch_size=500, publish_per_s=1.0)
    assert result["events_per_s"] == 3000
    # the median of the per-round ratios (4, 1.5, 4), not the ratio of the medians (3000 / 1000)
    assert result["ratio_to_ceiling"] == 4.0
    assert result["spread"]["ratio_to_ceiling"] == {"median": 4.0, "min": 1.5, "max": 4.0}
    assert result["spread"]["events_per_s"] == {"median": 3000.0, "min": 1000.0, "max": 4000.0}
    assert result["rounds"] == 3 and len(result["per_round"]) == 3
    assert result["processes"] == 2 and result["per_round"][0]["worker_events_per_process"] == [600, 400]


def test_a_skipped_reference_is_null_not_nan() -> None:
    only_worker = Round(("worker",), {"worker": Rate(1000, 1.0, 0, 1.0)}, applied_in_store=1000,
                        applied_per_process=[1000])
    args = argparse.Namespace(events=1000, users=10, items=10, partitions=4, processes=1)
    result = summary(args, [only_worker], items=10, batch_size=500, publish_per_s=1.0)
    assert result["ratio_to_ceiling"] is None and result["ceiling_events_per_s"] is None


def test_a_probe_is_answered_by_either_reason_that_names_its_clicked_item() -> None:
    from bench.freshness import reflects
    from core.events import RecommendedItem, RecResponse

    def answer(*reasons: str) -> RecResponse:
        return RecResponse(request_id="r", user_id="u", model_version="v", served_at=0.0, latency_ms=1.0,
                           items=[RecommendedItem(item_id=f"i{n}", score=1.0, reason=reason, title="")
                                  for n, reason in enumerate(reasons)])

    assert reflects(answer("trending now", "often chosen after 'synthetic item 7'"), "synthetic item 7")
    assert reflects(answer("because you viewed 'synthetic item 7'"), "synthetic item 7")
    assert not reflects(answer("trending now", "because you viewed 'synthetic item 70'"), "synthetic item 7")
