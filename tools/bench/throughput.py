"""Studies per hour: N 4-view studies queued at once, scored by each worker configuration in turn.

Same topology as `make demo` (Redis, Orthanc as the PACS, `serve`, the worker(s)), started afresh
for each configuration, which scores the same studies:

- `one-process`: the default worker, one process scoring one study at a time (the model on
  every core);
- `two-processes`: `mammo-node worker --concurrency 2`, two pool processes, each its own model;
- `batched`: one process scoring `--threads` studies at once on Celery's threads pool through
  one shared model that batches views across studies (`worker.batch_views`,
  `worker.batch_wait_ms`; pipelines/batching.py). `--batch-views 1,4,16,64` runs one
  `batched-<n>` configuration per size (what to measure on a GPU: `--device cuda`).

All studies are sent first (one association each), after one warm-up study, so the queue is full
while the worker scores; the rate is the number of studies over the time from the first send to
the last run in done/. Per worker process: that rate over the number of processes that hold a
model. The stages are the mean per study from the run records (a batched study carries its share
of each forward pass, and `batch_wait`, its wait for the batch to start).

The studies are rendered once (`--distinct` different pixel sets, tools/stack/make_study.py)
and copied under new UIDs up to `--studies`: rendering a 4096 x 3328 study takes seconds, and the
node scores a copy exactly like an original (nothing is cached between studies).

    .venv/bin/python -m tools.bench.throughput [--studies 50] [--configs one-process,batched]
        [--rows 4096 --cols 3328] [--device cpu|cuda] [--batch-views 16] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.uids import derive_uid
from tools.bench.e2e import STAGES
from tools.stack.make_study import make_study
from tools.stack.node_stack import DEFAULT_BUNDLE, NodeStack

CONFIGS = ("one-process", "two-processes", "batched")
BATCH_WAIT = "batch_wait"


@dataclass(frozen=True)
class Config:
    name: str
    processes: int  # worker processes holding a model
    worker_args: tuple[str, ...] = ()
    worker: dict[str, Any] | None = None  # the `worker` settings


@dataclass
class Outcome:
    config: Config
    studies: int
    not_done: int
    sent_s: float
    elapsed_s: float
    stages: dict[str, float]
    batch_sizes: list[int]

    @property
    def per_hour(self) -> float:
        return self.studies / self.elapsed_s * 3600


def configurations(names: Sequence[str], batch_views: Sequence[int], batch_wait_ms: float,
                   threads: int | None) -> list[Config]:
    configs = []
    for name in names:
        if name == "one-process":
            configs.append(Config(name, 1))
        elif name == "two-processes":
            configs.append(Config(name, 2, ("--concurrency", "2")))
        elif name == "batched":
            for size in batch_views:
                worker = {"batch_views": size, "batch_wait_ms": batch_wait_ms,
                          "threads": threads}
                label = name if len(batch_views) == 1 else f"{name}-{size}"
                configs.append(Config(label, 1, (), worker))
        else:
            raise SystemExit(f"unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
    return configs


def render_studies(folder: Path, count: int, distinct: int, rows: int, cols: int
                   ) -> list[tuple[list[Path], str]]:
    """`count` studies (files, study UID): `distinct` rendered, the others copies of them with
    their own study, series and instance UIDs (and patient), so each is its own run."""
    originals = [make_study(folder / f"original{i}", rows=rows, cols=cols, seed=2000 + i)
                 for i in range(min(distinct, count))]
    studies = []
    for index in range(count):
        source = originals[index % len(originals)]
        if index < len(originals):
            paths = source
        else:
            paths = []
            target = folder / f"study{index}"
            target.mkdir(parents=True)
            for path in source:
                ds = dcmread(path)
                ds.StudyInstanceUID = derive_uid(None, "bench", str(index), "study")
                ds.SeriesInstanceUID = derive_uid(None, "bench", str(index), str(ds.SeriesInstanceUID))
                ds.SOPInstanceUID = derive_uid(None, "bench", str(index), str(ds.SOPInstanceUID))
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.PatientID = f"BENCH{index:05d}"
                ds.AccessionNumber = f"B{index:05d}"
                ds.save_as(target / path.name, enforce_file_format=True)
                paths.append(target / path.name)
        studies.append((paths, str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)))
    return studies


def _wait_for_done(stack: NodeStack, count: int, timeout_s: float) -> None:
    """Until `count` runs are finished (a cheap listing, not a read of every record)."""
    deadline = time.monotonic() + timeout_s
    while len(stack.run_ids("done")) + len(stack.run_ids("failed")) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} runs not finished after {timeout_s} s: "
                               f"{stack.log_tail('worker')}")
        if stack.worker is not None and stack.worker.poll() is not None:
            raise RuntimeError(f"worker exited: {stack.log_tail('worker')}")
        time.sleep(0.1)


def _start_worker(stack: NodeStack, config: Config) -> None:
    stack.worker = stack._spawn("worker", "worker", *config.worker_args)
    deadline = time.monotonic() + 300
    while stack.log_tail("worker", 10_000_000).count('"event": "model_loaded"') < config.processes:
        if stack.worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not load its model(s): {stack.log_tail('worker')}")
        time.sleep(0.3)


def run_config(config: Config, work: Path, studies: list[tuple[list[Path], str]],
               device: str, bundle: Path | None) -> Outcome:
    overrides: dict[str, Any] = {"model": {"device": device}}
    if config.worker:
        overrides["worker"] = {k: v for k, v in config.worker.items() if v is not None}
    folder = work / config.name
    try:
        with NodeStack(folder, quiet_period_s=30, with_worker=False, config_overrides=overrides,
                       bundle_dir=bundle.resolve() if bundle else DEFAULT_BUNDLE) as stack:
            _start_worker(stack, config)
            (warm_paths, warm_uid), queued = studies[0], studies[1:]
            if stack.storescu(warm_paths).returncode != 0:
                raise RuntimeError("the warm-up study was not accepted")
            stack.wait_for_record(warm_uid, timeout_s=600)
            started = time.monotonic()
            for paths, _ in queued:
                result = stack.storescu(paths)
                if result.returncode != 0:
                    raise RuntimeError(result.stderr)
            sent_s = time.monotonic() - started
            _wait_for_done(stack, len(studies), timeout_s=600 + 60 * len(queued))
            elapsed_s = time.monotonic() - started
            uids = {uid for _, uid in queued}
            records = [r for state in ("done", "failed") for r in stack.records(state)
                       if r.get("study_uid") in uids]
            batches = [line for line in stack.log_tail("worker", 100_000_000).splitlines()
                       if '"event": "model_batch"' in line]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    stages = {stage: statistics.mean(float((r.get("timings_s") or {}).get(stage, 0.0))
                                     for r in records)
              for stage in (*STAGES, BATCH_WAIT)}
    sizes = [int(line.split('"views": ')[1].split(",")[0]) for line in batches]
    return Outcome(config, len(records), sum(1 for r in records if r["state"] != "done"),
                   sent_s, elapsed_s, stages, sizes[1:])  # the first batch is the warm-up's


def report(outcomes: list[Outcome], args: argparse.Namespace, size_mb: float) -> str:
    load = os.getloadavg()
    bundle = json.loads(((args.bundle or DEFAULT_BUNDLE) / "metadata.json").read_text())
    lines = [
        f"{dt.date.today().isoformat()}, machine `{platform.node()}` ({os.cpu_count()} cores, "
        f"device {args.device}, Python {platform.python_version()}), bundle "
        f"{bundle.get('name')} {bundle.get('version')}, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); "
        f"{args.studies} uncompressed 4 x {args.rows} x {args.cols} studies ({size_mb:.0f} MB "
        f"each), all sent at once after a warm-up study:",
        "",
        "| configuration | studies/h per machine | studies/h per worker process | "
        "all sent after (s) | last result after (s) | not done | mean views per forward pass |",
        "|---|---|---|---|---|---|---|",
    ]
    reference = outcomes[0].per_hour
    for o in outcomes:
        sizes = f"{statistics.mean(o.batch_sizes):.1f}" if o.batch_sizes else "4 (one study)"
        ratio = f" ({o.per_hour / reference:.2f} x)" if o is not outcomes[0] else ""
        lines.append(f"| {o.config.name} | **{o.per_hour:,.0f}**{ratio} | "
                     f"{o.per_hour / o.config.processes:,.0f} | {o.sent_s:.1f} | "
                     f"{o.elapsed_s:.1f} | {o.not_done} | {sizes} |")
    lines += ["", "Seconds per study (mean of the run records):", "",
              "| stage | " + " | ".join(o.config.name for o in outcomes) + " |",
              "|---|" + "---|" * len(outcomes)]
    for stage in (*STAGES, BATCH_WAIT):
        label = {"queue": "queue (waiting for a worker)",
                 BATCH_WAIT: "batch_wait (views waiting for their batch)"}.get(stage, stage)
        lines.append(f"| {label} | " + " | ".join(f"{o.stages[stage]:.2f}" for o in outcomes)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--distinct", type=int, default=4,
                        help="pixel sets rendered; the other studies are copies under new UIDs")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=3328)
    parser.add_argument("--configs", default="one-process,batched",
                        help=f"comma-separated, run in this order (known: {', '.join(CONFIGS)})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="model.device of every configuration")
    parser.add_argument("--batch-views", default="16",
                        help="views per forward pass of `batched`; a list (1,4,16,64) runs one "
                             "configuration per size")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="studies in flight of `batched` (default: batch_views // 4 + 1)")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the shipped one)")
    args = parser.parse_args(argv)
    configs = configurations(args.configs.split(","), [int(v) for v in args.batch_views.split(",")],
                             args.batch_wait_ms, args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    try:
        began = time.monotonic()
        # One more than asked: the first warms each configuration's worker up, alone.
        studies = render_studies(work / "studies", args.studies + 1, args.distinct, args.rows,
                                 args.cols)
        print(f"rendered {len(studies)} studies in {time.monotonic() - began:.0f} s", flush=True)
        outcomes = []
        for config in configs:
            outcome = run_config(config, work, studies, args.device, args.bundle)
            print(f"{config.name}: {outcome.per_hour:.0f} studies/h "
                  f"({outcome.elapsed_s:.1f} s)", flush=True)
            outcomes.append(outcome)
        size_mb = sum(p.stat().st_size for p in studies[1][0]) / 1e6
        print("\n" + report(outcomes, args, size_mb))
        print(f"\nwall time of the benchmark: {time.monotonic() - began:.0f} s")
        return 1 if any(o.not_done for o in outcomes) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
