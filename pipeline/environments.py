"""One run, several inference environments (a recipe's `environments:`): ZipLM's "one database, any inference
environment" made literal.

The teacher, the calibration and the OBS database depend on the model and the data only, so the stage cache builds
them once; each environment then gets its own latency table, search, closed loop and verified members, in
OUT/<environment>/ (a family folder like any other: report.json, report.md, dense/, a folder per member). The
members are named after the recipe and the environment (minilm-mr-openvino-2x). OUT/report.json lists every
member (each with its `environment` and its `folder`), and OUT/report.md compares the environments goal
by goal: what each measured, and how differently each runtime's table shaped the same target.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ziplm.cache import write_json_atomic, write_text_atomic
from ziplm.pipeline.recipe import Recipe
from ziplm.pipeline.report import environment_line

Family = Callable[[Recipe, Path], dict[str, Any]]  # a recipe of one environment run into a folder: its report


def run_environments(recipe: Recipe, out: Path, run_family: Family,
                     progress: Callable[[str], None]) -> dict[str, Any]:
    """Each environment's family (`run_family`, sharing one stage cache), then the comparison in `out`."""
    reports = {}
    for index, name in enumerate(recipe.environments, 1):
        progress(f"{index}/{len(recipe.environments)}: {name} ({recipe.environments[name].runtime})")
        reports[name] = run_family(recipe.for_environment(name), out / name)
    return write_comparison(out, recipe, reports)


def write_comparison(out: Path, recipe: Recipe, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    members = [{**member, "environment": name, "folder": f"{name}/{member['name']}"}
               for name, report in reports.items() for member in report["members"]]
    comparison = {"recipe": recipe.model_dump(mode="json"), "members": members,
                  "environments": {name: {"runtime": report["runtime"], "report": f"{name}/report.json",
                                          "dense": report["dense"],
                                          "max_reachable_speedup": report["max_reachable_speedup"]}
                                   for name, report in reports.items()}}
    write_text_atomic(out / "report.md", comparison_markdown(comparison))
    write_json_atomic(out / "report.json", comparison)  # last: a report.json says the whole report is there
    return comparison


def goal(member: dict[str, Any]) -> str:
    """What a member was built for, the same across environments: "2x", or an SLA such as "p90<=12ms"."""
    sla = member.get("sla")
    return f"{sla['metric']}<={sla['ms']:g}ms" if sla else f"{member['target_speedup']:g}x"


def comparison_markdown(comparison: dict[str, Any]) -> str:
    environments = comparison["environments"]
    lines = [f"# ZipLM across environments: {comparison['recipe']['name']}", "",
             "One teacher, calibration and OBS database; per environment its own latency table, search and closed "
             "loop, every member verified in its runtime beside that runtime's dense model.", "",
             "| environment | where | dense latency (median) | largest reachable speedup |", "|---|---|---|---|"]
    lines += [f"| {name} | {environment_line(env['runtime'])} | {env['dense']['latency_ms']['median']:.2f} ms "
              f"| {env['max_reachable_speedup']:.2f}x |" for name, env in environments.items()]
    by_goal: dict[str, list[dict[str, Any]]] = {}
    for member in comparison["members"]:
        by_goal.setdefault(goal(member), []).append(member)
    for name, members in by_goal.items():
        lines += ["", f"## {name}", "", "| environment | measured speedup (deviation) | metric | attention units kept "
                  "| FFN neurons kept | layers shaped otherwise than in " + members[0]["environment"] + " |",
                  "|---|---|---|---|---|---|"]
        lines += [_member_row(member, members[0], environments[member["environment"]]["dense"]["structure"])
                  for member in members]
    return "\n".join(lines + [""])


def _member_row(member: dict[str, Any], first: dict[str, Any], dense: dict[str, list[int]]) -> str:
    structure, metric = member["structure"], member["metric"]
    differing = sum(layer != other for layer, other in zip(_layers(structure), _layers(first["structure"])))
    return (f"| {member['environment']} | {member['measured_speedup']:.3f}x ({member['deviation']:+.1%}) "
            f"| {metric['name']} {metric['value']:.4f} | {sum(structure['units'])}/{sum(dense['units'])} "
            f"| {sum(structure['ffn'])}/{sum(dense['ffn'])} | {differing} of {len(structure['units'])} |")


def _layers(structure: dict[str, list[int]]) -> list[tuple[int, int]]:
    return list(zip(structure["units"], structure["ffn"]))
