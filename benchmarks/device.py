"""Device benchmark: one phone's task with the Gboard-size plan, against the real server.

`make bench-device` exports the Gboard plan from the seeded initial weights
(`models.simulate.initial_weights(GBOARD)`), starts the real server (gunicorn,
SQLite, loopback; emulation.deployment's helpers) with one population whose rounds
need one report, and runs one device holding the largest training client of
the Shakespeare corpus (by windows) through two check-ins:

* a cold task: the plan (5.9 MB), its vocabulary and the round's checkpoint
  are downloaded and verified, LiteRT loads the plan;
* a warm task (the next round): only the new checkpoint is downloaded.

For each it reports the runtime's own phase timings from its participation
log — download, prepare (LiteRT load, checkpoint read, tokenization), train
(and ms per batch), upload — bytes in and out, batches and examples. The
device runs in a child process without TensorFlow, as on a phone, with one
LiteRT thread, which also measures its memory growth against the runtime's
estimate. Everything is on 127.0.0.1 and stops by itself; the machine's 2
cores are shared with the server (and whatever else runs): figures are noisy,
and the load average is recorded. Writes `benchmarks/results/device.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from benchmarks import write_result
from contract.cli import ArgumentParser, parse

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NIGHT = "2026-11-23T23:30:00"
PHASES = ("download_s", "prepare_s", "train_s", "upload_s")


def _mib(field: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(field + ":")) / 1024


def phone(server_url: str, data: Path, texts_file: Path, enrollment_file: Path) -> dict:
    """The device side (child process, no TensorFlow): two steps, each a task; their log entries."""
    import datetime as dt

    from device_runtime.conditions import EmulatedConditions
    from device_runtime.enrollment import Enrollment
    from device_runtime.runtime import Device, DeviceSettings

    rss, hwm = _mib("VmRSS"), _mib("VmHWM")
    device = Device(data, server_url, EmulatedConditions(lambda: dt.datetime.fromisoformat(NIGHT)),
                    settings=DeviceSettings("en", num_threads=1), seed=0,
                    enrollment=Enrollment.from_file(enrollment_file))
    device.examples.add_many((t, time.time()) for t in json.loads(texts_file.read_text()))
    tasks = []
    for _ in range(2):
        device.step()
        tasks.append(next(e for e in device.opstats.events() if e["kind"] == "task"))
    device.close()
    return {"tasks": tasks, "rss_growth_mib": round(max(_mib("VmRSS") - rss, _mib("VmHWM") - hwm), 1),
            "tensorflow_imported": any(m.startswith("tensorflow") for m in sys.modules)}


def gboard_model(root: Path, corpus):
    """The seeded initial Gboard model, its checkpoint, vocabulary and training plan (timed)."""
    from models.model import GBOARD
    from emulation.models import initial_model

    t0 = time.monotonic()
    model = initial_model(root, corpus, GBOARD)
    assert model.config == GBOARD, "the corpus vocabulary is not the Gboard config's"
    return model, time.monotonic() - t0


def summarize(task: dict) -> dict:
    out = {k: round(task[k], 3) for k in PHASES if k in task}
    out.update({k: task[k] for k in ("outcome", "bytes_in", "bytes_out", "batches", "examples")})
    if task.get("batches"):
        out["train_ms_per_batch"] = round(1000 * task["train_s"] / task["batches"], 1)
    out["total_s"] = round(sum(task[k] for k in PHASES if k in task), 3)
    return out


def run(args: argparse.Namespace) -> dict:
    from benchmarks.export import _cpu_name
    from models.corpus import load_corpus
    from emulation.deployment import start_server
    from server.config import load_config

    load_start = os.getloadavg()
    corpus = load_corpus()
    client = max(corpus.train, key=lambda c: len(corpus.train[c]))
    with tempfile.TemporaryDirectory(prefix="nightjar-bench-device-") as tmp:
        root = Path(tmp)
        model, export_s = gboard_model(root / "model", corpus)
        (root / "texts.json").write_text(json.dumps(corpus.train_texts[client]))
        server = start_server(root / "server", model, reporting_window_s=3600.0)
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.device", "phone", "--server", server.url,
                                   "--data", str(root / "phone"), "--texts", str(root / "texts.json"),
                                   "--enrollment", str(load_config(server.config).enrollment_path("en"))],
                                  cwd=REPO, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        finally:
            server.kill()
        if done.returncode != 0:
            raise RuntimeError(f"the device failed:\n{done.stderr[-3000:]}")
        device = json.loads(done.stdout.splitlines()[-1])
        estimate = estimate_mib(model.plan_dir, len(corpus.train_texts[client]))
        plan_bytes = (model.plan_dir / "plan.tflite").stat().st_size
    cold, warm = (summarize(t) for t in device["tasks"])
    return {
        "config": "gboard", "parameters": int(model.flat.size), "litert_threads": 1,
        "plan_bytes": plan_bytes,
        "client": client, "client_windows": int(len(corpus.train[client])),
        "hyperparameters": {"epochs": 1, "batch_size": 16, "max_examples": None},
        "cold_task": cold, "warm_task": warm,
        "download_s": cold["download_s"], "train_s": cold["train_s"], "upload_s": cold["upload_s"],
        "train_ms_per_batch": cold["train_ms_per_batch"],
        "bytes_in": cold["bytes_in"], "bytes_out": cold["bytes_out"],
        "batches": cold["batches"], "examples": cold["examples"],
        "device_rss_growth_mib": device["rss_growth_mib"],
        "task_memory_estimate_mib": round(estimate, 1),
        "device_imported_tensorflow": device["tensorflow_imported"],
        "model_and_plan_export_s": round(export_s, 1),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in load_start],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
        "note": args.note,
    }


def estimate_mib(plan_dir: Path, texts: int) -> float:
    from device_runtime.task import estimated_task_memory_mb
    from contract.artifacts.manifest import read_manifest

    return estimated_task_memory_mb(read_manifest(plan_dir / "plan.manifest.json"), texts, 1)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.device", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    ph = sub.add_parser("phone", help="(internal) the device side, in a TensorFlow-free process")
    ph.add_argument("--server", required=True)
    ph.add_argument("--data", required=True, type=Path)
    ph.add_argument("--texts", required=True, type=Path)
    ph.add_argument("--enrollment", required=True, type=Path)
    p.add_argument("--out", default=str(RESULTS / "device.json"))
    p.add_argument("--note", default="", help="context to record with the figures (e.g. other load)")
    args = parse(p, argv)
    if args.command == "phone":
        print(json.dumps(phone(args.server, args.data, args.texts, args.enrollment)))
        return 0
    result = run(args)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
