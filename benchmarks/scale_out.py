"""Scale-out (docs/scale-out.md): the OBS database built as Ray tasks with 1, 2 and 4 workers, and layer-sequential
calibration's peak memory against whole-model calibration.

1. Memory: each calibration runs in a process of its own, on a model folder: the bert-base shape (random weights,
   seed 0, 512 MR calibration sentences through MiniLM's tokenizer) and SmolLM2-135M (its de-quantised folder, the 100
   Shakespeare calibration blocks of 256 tokens of `smollm2_shakespeare`). Whole: `load_model`, then every batch
   through the whole model (as `ziplm run` calibrates), Hessians written at the end. Layer-sequential: `load_skeleton`
   and `layer_sequential_hessians`, each layer's Hessians written as it finishes. Peak = the process's peak resident
   memory (VmHWM: ru_maxrss would count the benchmark's own memory, which the child inherits at fork) less its
   resident memory just before the model is loaded (imports, tokenizer, data). The two Hessian sets are compared bit
   for bit.
2. Database: the bert-base shape's OBS database from those Hessians, built here (2 threads and 1 thread) and as Ray
   tasks on a local Ray instance of 1, 2 and 4 workers (`num_cpus`), each task with 1 torch thread (the driver's,
   which the tasks take for bit-equality); each Ray database compared with the local 1-thread one bit for bit.

    python -m benchmarks.scale_out [--workers 1 2 4] [--samples 512] [--skip-memory] [--skip-database]

writes benchmarks/results/scale_out.md, .json and scale_out.png. Nothing else should run meanwhile: the database
times are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from benchmarks.common import RESULTS, head_commit, progress, write_results
from ziplm.assets import resolve_model
from ziplm.cache import cache_root
from ziplm.families import adapter_for
from ziplm.families.loading import build_model, load_config, load_model, load_skeleton, save_model
from ziplm.pipeline.recipe import load_recipe
from ziplm.runtimes import fleet
from ziplm.stages import ziplm as zipl
from ziplm.stages.calibrate import (CalibrationSettings, calibration_batches, layer_sequential_hessians,
                                    load_hessians, save_hessians, whole_model_hessians)
from ziplm.tasks import TaskSpec, load_task

COMMAND = "python -m benchmarks.scale_out"
SUBJECTS = {"bert-base": "bert-base shape (random weights), MR", "smollm2": "SmolLM2-135M, Shakespeare"}
GROUP_SIZE = 32
MB = 2 ** 20


def subject_folder(subject: str) -> Path:
    """A model folder of safetensors: the bert-base shape written once (random weights, MiniLM's tokenizer), or the
    de-quantised SmolLM2 folder."""
    if subject == "smollm2":
        return Path(resolve_model("smollm2"))
    folder = cache_root() / "benchmarks" / "bert-base-random"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        save_model(build_model(load_config("bert-base")), folder)
        AutoTokenizer.from_pretrained(resolve_model("minilm")).save_pretrained(folder)
    return folder


def subject_batches(subject: str, folder: Path, samples: int) -> list[dict[str, torch.Tensor]]:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if subject == "smollm2":
        task = load_task(load_recipe("smollm2_shakespeare").task).cut(tokenizer)
    else:
        task = load_task(TaskSpec(data="mr"))
    return calibration_batches(tokenizer, task, CalibrationSettings(samples=samples))


def calibrate_in_this_process(subject: str, mode: str, samples: int, out: Path) -> dict[str, Any]:
    """One calibration (`mode`: whole or sequential) of a subject, Hessians written to `out`; its memory and time."""
    folder = subject_folder(subject)
    encoded = subject_batches(subject, folder, samples)
    before = resident_mb()
    start = time.perf_counter()
    say = progress(f"{subject} {mode}")
    if mode == "whole":
        model = load_model(str(folder))
        save_hessians(whole_model_hessians(model, adapter_for(model.config), encoded, say), out)
    else:
        model, layers = load_skeleton(str(folder))
        save_hessians(layer_sequential_hessians(model, adapter_for(model.config), encoded, say, layers), out)
    config = model.config
    return {"subject": subject, "mode": mode, "seconds": round(time.perf_counter() - start, 1),
            "resident_before_mb": round(before), "peak_mb": round(peak_mb()),
            "peak_above_before_mb": round(peak_mb() - before),
            "sequences": sum(len(batch["input_ids"]) for batch in encoded),
            "positions": sum(batch["input_ids"].numel() for batch in encoded),
            "weights_mb": round(sum(file.stat().st_size for file in folder.glob("*.safetensors")) / MB),
            "hidden_states_mb": round(sum(batch["input_ids"].numel() for batch in encoded) * config.hidden_size * 4
                                      / MB)}


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS), or its peak since it started its program (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_mb() -> float:
    return resident_mb("VmHWM")


def memory(subject: str, samples: int, work: Path) -> dict[str, Any]:
    """Both calibrations of a subject, each in a fresh process; whether their Hessians are equal bit for bit."""
    runs = {}
    for mode in ("whole", "sequential"):
        out = work / f"{subject}-{mode}"
        out.mkdir()
        command = [sys.executable, "-m", "benchmarks.scale_out", "--calibrate", subject, mode, str(samples), str(out)]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    whole, sequential = (load_hessians(work / f"{subject}-{mode}") for mode in ("whole", "sequential"))
    equal = all(torch.equal(a.attention, b.attention) and torch.equal(a.ffn, b.ffn) and a.tokens == b.tokens
                for a, b in zip(whole, sequential, strict=True))
    return {"subject": subject, "label": SUBJECTS[subject], "commit": head_commit(), "equal_bit_for_bit": equal,
            "hessians_mb": round(sum(H.numel() * 8 for layer in whole for H in (layer.attention, layer.ffn)
                                     if H is not None) / MB),
            "layers": len(whole), **runs}


def database_times(hessians_folder: Path, workers: list[int]) -> dict[str, Any]:
    """The bert-base shape's database built here (2 and 1 threads) and on Ray with each number of workers."""
    import ray

    model = load_model(str(subject_folder("bert-base")))
    adapter, hessians = adapter_for(model.config), load_hessians(hessians_folder)
    say = progress("database")
    rows, reference = [], None
    for threads in (2, 1):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        database = zipl.build_database(model, adapter, hessians, GROUP_SIZE, progress=lambda _: None)
        rows.append({"where": f"here, {threads} torch thread{'s' * (threads > 1)}", "workers": 0, "threads": threads,
                     "seconds": round(time.perf_counter() - start, 1)})
        say(f"{rows[-1]['where']}: {rows[-1]['seconds']} s")
        reference = database
    for count in workers:
        started = time.perf_counter()
        ray.init(num_cpus=count, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        cluster_seconds = time.perf_counter() - started
        start = time.perf_counter()
        database = zipl.build_database(model, adapter, hessians, GROUP_SIZE, run_passes=fleet.run_passes)
        seconds = time.perf_counter() - start
        ray.shutdown()
        rows.append({"where": f"Ray, {count} worker{'s' * (count > 1)}", "workers": count, "threads": 1,
                     "seconds": round(seconds, 1), "ray_start_seconds": round(cluster_seconds, 1),
                     "equal_to_local_1_thread": same_database(database, reference)})
        say(f"{rows[-1]['where']}: {rows[-1]['seconds']} s (equal: {rows[-1]['equal_to_local_1_thread']})")
    torch.set_num_threads(os.cpu_count() or 1)
    one = next(row["seconds"] for row in rows if row["workers"] == 1) if 1 in workers else None
    for row in rows:
        row["speedup_over_1_worker"] = round(one / row["seconds"], 2) if one else None
    jobs = zipl.module_jobs(model, adapter, hessians, GROUP_SIZE, zipl.ZipLMSettings())
    travels = sum(t.numel() * t.element_size() for job in jobs for t in (job.W, job.H) if t is not None)
    return {"rows": rows, "passes": len(jobs), "travel_out_mb": round(travels / MB), "cores": os.cpu_count(),
            "commit": head_commit()}


def same_database(a: zipl.Database, b: zipl.Database) -> bool:
    return all(np.array_equal(x.error(), y.error()) and torch.equal(x.weights(0), y.weights(0)) and
               torch.equal(x.path.A, y.path.A) for x, y in zip(a.modules, b.modules, strict=True))


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Scale-out: the database on Ray workers, and layer-sequential calibration's memory", "",
             f"`{COMMAND}`; {result['cores']} cores; each part names the commit it was measured at. Method: "
             "benchmarks/scale_out.py's docstring; how to run a fleet: docs/scale-out.md.", ""]
    if result.get("database"):
        database = result["database"]
        lines += ["## OBS database of the bert-base shape (12 layers, group size 32)", "",
                  f"At commit {database['commit']}. {database['passes']} independent passes (attention and FFN of "
                  f"every layer); what travels to the workers: {database['travel_out_mb']} MB of W and H (and the "
                  "paths back).", "",
                  "| where | seconds | speedup over 1 Ray worker | equal to the local build (1 thread) |",
                  "|---|---|---|---|"]
        equal = {True: "yes", False: "NO", None: ""}
        lines += [f"| {row['where']} | {row['seconds']} | {row['speedup_over_1_worker'] or ''} | "
                  f"{equal[row.get('equal_to_local_1_thread')]} |" for row in database["rows"]]
        lines += ["", database_reading(database), ""]
    for entry in result.get("memory", []):
        whole, sequential = entry["whole"], entry["sequential"]
        lines += [f"## Calibration memory: {entry['label']}", "",
                  f"At commit {entry['commit']}. {whole['sequences']} sequences ({whole['positions']:,} positions), "
                  f"{entry['layers']} layers; "
                  f"weights {whole['weights_mb']} MB, all layers' Hessians (float64) {entry['hessians_mb']} MB, the "
                  f"hidden states of the calibration set at one layer {whole['hidden_states_mb']} MB. Hessians equal "
                  f"bit for bit: {'yes' if entry['equal_bit_for_bit'] else 'NO'}.", "",
                  "| calibration | peak above the process before the model (MB) | peak resident (MB) | seconds |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {run['peak_above_before_mb']} | {run['peak_mb']} | {run['seconds']} |"
                  for name, run in (("whole model", whole), ("layer-sequential", sequential))]
        lines += ["", memory_reading(entry), ""]
    lines += ["![scale-out](scale_out.png)", ""]
    return "\n".join(lines)


def database_reading(database: dict[str, Any]) -> str:
    """What the times say, from the times."""
    seconds = {row["where"]: row["seconds"] for row in database["rows"]}
    ray = [row for row in database["rows"] if row["workers"]]
    here = next(row["seconds"] for row in database["rows"] if row["threads"] == 1 and not row["workers"])
    text = [f"Each Ray task computes with one torch thread (the driver's: a product split over another number of "
            f"threads sums in another order, and the database would differ in its last bits). "
            f"Here with 1 thread: {here} s; with 2 threads: {seconds.get('here, 2 torch threads')} s."]
    text += [f"{row['where']}: {row['speedup_over_1_worker']}x the speed of 1 worker" for row in ray[1:]]
    text += [f"On {database['cores']} cores a worker adds speed only while it has a core of its own: beyond "
             f"{database['cores']} workers the tasks share the cores (and the memory bandwidth the FFN passes, "
             "3072 x 3072 float64 inverse Hessians, are bound by), so the build is no faster; across nodes each "
             "worker brings its own. Against the build here with the same thread, 1 Ray worker costs the start of "
             "its worker process and W and H through the object store."]
    return " ".join(f"{sentence}." if not sentence.endswith(".") else sentence for sentence in text)


def memory_reading(entry: dict[str, Any]) -> str:
    whole, sequential = entry["whole"]["peak_above_before_mb"], entry["sequential"]["peak_above_before_mb"]
    return (f"Layer-sequential peak: {sequential} MB, {100 * sequential / whole:.0f}% of the whole model's {whole} MB. "
            "It holds the weights outside the layers (embeddings, final norm, head), one layer's weights and "
            "Hessians, and the calibration set's hidden states at one layer; the whole-model "
            "pass holds every layer's weights and every layer's Hessian accumulators at once.")


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if result.get("database"):
        rows = result["database"]["rows"]
        left.bar([row["where"].replace(", ", "\n") for row in rows], [row["seconds"] for row in rows])
        left.set_ylabel("seconds")
        left.set_title(f"bert-base database build ({result['cores']} cores)")
    for offset, entry in enumerate(result.get("memory", [])):
        values = [entry["whole"]["peak_above_before_mb"], entry["sequential"]["peak_above_before_mb"]]
        right.bar([offset * 3, offset * 3 + 1], values, color=["tab:red", "tab:green"])
    right.set_xticks([offset * 3 + 0.5 for offset in range(len(result.get("memory", [])))],
                     [entry["label"] for entry in result.get("memory", [])])
    right.set_ylabel("peak memory above the process before the model (MB)")
    right.set_title("calibration: whole model (red) vs layer-sequential (green)")
    figure.tight_layout()
    figure.savefig(RESULTS / "scale_out.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=512, help="calibration sequences (SmolLM2 has 100)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-database", action="store_true")
    parser.add_argument("--calibrate", nargs=4, metavar=("SUBJECT", "MODE", "SAMPLES", "OUT"),
                        help=argparse.SUPPRESS)  # one calibration in this process (the memory part runs it)
    args = parser.parse_args()
    if args.calibrate:
        subject, mode, samples, out = args.calibrate
        print(json.dumps(calibrate_in_this_process(subject, mode, int(samples), Path(out))))
        return
    stored = json.loads((RESULTS / "scale_out.json").read_text()) if (RESULTS / "scale_out.json").exists() else {}
    result = {**stored, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="ziplm-scale-out-") as tmp:
        work = Path(tmp)
        if not args.skip_memory:
            result["memory"] = [memory(subject, args.samples, work) for subject in SUBJECTS]
        if not args.skip_database:
            hessians = work / "bert-base-sequential"
            if not hessians.exists():
                hessians.mkdir()
                subprocess.run([sys.executable, "-m", "benchmarks.scale_out", "--calibrate", "bert-base",
                                "sequential", str(args.samples), str(hessians)], check=True, stdout=subprocess.DEVNULL)
            result["database"] = database_times(hessians, args.workers)
    write_results("scale_out", result, markdown(result))
    plot(result)


if __name__ == "__main__":
    main()
