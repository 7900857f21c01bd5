"""Synthetic interaction logs with a known answer, for tests that training learns what it should.

interest_log(): each user has a few categories of interest; their first behaviours are organic
clicks in those categories, then come impressions of random items, each clicked exactly when the
item's category appears among the user's recent behaviours. Only a model that compares the
candidate with each behaviour can rank these well: attention can; sum pooling blurs the history
into one vector first.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def interest_log(
    path: Path,
    users: int = 400,
    categories: int = 30,
    items_per_category: int = 20,
    interests: int = 3,
    organic: int = 8,
    impressions: int = 30,
    history: int = 20,
    seed: int = 0,
) -> Path:
    """Write a labelled CSV log (user_id,item_id,timestamp,category,label) to path.

    An impression is a positive exactly when its item's category is among the categories of the
    user's last `history` behaviours (positive events), the history the model sees when trained
    with --max-history-length `history`. Half the impressions show an item of one of the user's
    interest categories, so the classes stay near balanced.
    """
    rng = np.random.default_rng(seed)
    n_items = categories * items_per_category

    def item_in(category: int) -> int:
        return int(category * items_per_category + rng.integers(items_per_category))

    rows: list[tuple[str, str, int, str, int]] = []
    for user in range(users):
        liked = rng.choice(categories, size=interests, replace=False)
        behaviours: list[int] = []  # item ids, oldest first
        clock = 1_000_000 + user * 10_000
        for step in range(organic + impressions):
            clock += 1
            if step < organic:
                item, label = item_in(int(rng.choice(liked))), 1
            else:
                if rng.random() < 0.5:
                    item = item_in(int(rng.choice(liked)))
                else:
                    item = int(rng.integers(n_items))
                recent = {b // items_per_category for b in behaviours[-history:]}
                label = int(item // items_per_category in recent)
            rows.append((f"u{user}", f"i{item}", clock, f"c{item // items_per_category}", label))
            if label:
                behaviours.append(item)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "category", "label"])
        writer.writerows(rows)
    return path


def sparse_log(
    path: Path, users: int = 1000, events: int = 20, catalogue: int = 200_000, seed: int = 0
) -> Path:
    """An implicit CSV log (user_id,item_id,timestamp,category) in which nothing predicts a click.

    Every event's item is drawn from the same uniform distribution over a catalogue so large that
    most items occur once, like the long tail of an e-commerce log: most validation and test items
    were never seen in training.
    """
    rng = np.random.default_rng(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "category"])
        for user in range(users):
            for t, item in enumerate(rng.integers(catalogue, size=events)):
                writer.writerow([f"u{user}", f"i{item}", 1_000_000 + t, f"c{item % 50}"])
    return path


def behavior_log(path: Path, users: int = 200, events: int = 30, seed: int = 0) -> Path:
    """A Taobao-style log: user_id,item_id,category,behavior,timestamp plus an unused price.

    Buys are of items in the user's favourite categories, page views of anything.
    """
    rng = np.random.default_rng(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "category", "behavior", "timestamp", "price"])
        for user in range(users):
            liked = rng.choice(20, size=2, replace=False)
            for t in range(events):
                kind = str(rng.choice(["pv", "pv", "pv", "cart", "fav", "buy"]))
                category = int(rng.choice(liked)) if kind != "pv" else int(rng.integers(20))
                item = category * 30 + int(rng.integers(30))
                writer.writerow([f"u{user}", f"i{item}", f"c{category}", kind, 1000 + t, "9.99"])
    return path
