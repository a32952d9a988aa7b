"""Run by test_sqlite.py as a child process: create jobs one after another and print each id as
soon as ``create_job`` returned (the moment the service would answer 202). The parent SIGKILLs it
at a random point and checks that every printed id is in the database."""

from __future__ import annotations

import asyncio
import sys

from comfy_orchestrator.store import SQLiteJobStore


async def main(db: str, outputs: str, count: int, start: int, synchronous: str) -> None:
    async with SQLiteJobStore(db, outputs, synchronous=synchronous) as store:  # type: ignore[arg-type]
        for i in range(start, start + count):
            job, _ = await store.create_job("acme", "graph", {"i": i}, idempotency_key=f"k{i}")
            sys.stdout.write(f"{job.id}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
