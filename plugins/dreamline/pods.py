"""`make pods`: the manifest of every pod one run of the DAG would launch in kubernetes mode, for a given conf,
without a cluster or a database.

    python -m dreamline.pods --settings deploy/kubernetes/dreamline.env --subject dog --conf '{"max_steps": 200}'

The deployment settings come from the file (KEY=VALUE lines, as Airflow's environment would hold them) over the
environment. The DAG is parsed as Airflow parses it; the trigger form's Params are merged with the conf and
validated; each step task's templated options are rendered with Airflow's own template environment, and mapped
tasks get the options the DAG would compute (dreamline.plan) from predicted results of the tasks before them: the
dataset has `--images` images, something changed since the champion was trained (so the run trains), training
writes every checkpoint, and a champion exists unless `--no-champion`. Values known only at run time appear as
`<task.field>`.
"""
from __future__ import annotations

import argparse
import copy
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace



def read_settings(path: str) -> dict[str, str]:
    settings = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            if "=" not in line:
                raise SystemExit(f"error: {path}:{number}: not KEY=VALUE")
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def planned_pods(conf: dict, images: int = 5, champion: bool = True, run_id: str = "manual__2026-01-01T02:00:00",
                 subject: str = "dog") -> list[tuple[str, object]]:
    """[(what, V1Pod)] in the order the DAG runs them. Needs DREAMLINE_EXECUTOR=kubernetes in the environment
    before dreamline is first imported."""
    from airflow.dag_processing.dagbag import DagBag

    from dreamline import plan
    from dreamline.deployment import DEPLOYMENT, REPO_ROOT
    from dreamline.params import MAX_RUNGS
    from dreamline.operators import step_operator_class

    DEPLOYMENT.check()
    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    if bag.import_errors:
        raise SystemExit(f"error: the DAG does not parse: {bag.import_errors}")
    if f"lora_{subject}" not in bag.dags:
        raise SystemExit(f"error: no subject {subject!r} in the subject registry; subjects: "
                         f"{', '.join(d.removeprefix('lora_') for d in bag.dags if d.startswith('lora_'))}")
    dag = bag.dags[f"lora_{subject}"]
    merged = copy.deepcopy(dag.params)
    merged.update(conf)  # each value checked against its Param's schema, as the trigger form does
    params = merged.validate()
    try:
        recipe = plan.check_recipe(params)  # what the DAG's first task refuses
    except plan.RecipeError as exc:
        raise SystemExit(f"error: --conf: {exc}") from None
    run = DEPLOYMENT.run_dir(dag.dag_id, run_id)
    to_pin = plan.models_to_pin(params, run)
    pinned = {name: f"{ref}@<commit>" if not ref.startswith("/") else ref for name, ref in to_pin.items()
              if name in plan.MODEL_SETTINGS and ref}
    form, params = params, plan.with_pinned_models(params, pinned)  # what the steps after `models` are given
    trained = [{"learning_rate": lr, "checkpoints": [
        {"step": s, "uri": f"{run}/train/{plan.run_name(lr)}/checkpoint-{s}"} for s in checkpoint_steps(params)]}
        for lr in params["learning_rates"]]
    current = {"checkpoint": f"{run}/champion" if champion else None, "version": 1 if champion else None}
    evaluations = plan.evaluation_options(params, run, trained, current)
    results = {  # what the tasks that templates pull from would return
        "recipe": recipe, "models": pinned, "checkpoint_evaluations": evaluations,
        "dataset": {"rev": params["dataset_version"], "commit": "<dataset.commit>", "hash": "<dataset.hash>",
                    "consent_id": "<dataset.consent_id>"},
        "mlflow_run": {"run_id": "<mlflow_run.run_id>"},
        "class_images": {"images": DEPLOYMENT.cache_dir("class-images") + "/<class_images.key>"},
        "encode_class_images": {"cache": DEPLOYMENT.cache_dir("encode") + "/<encode_class_images.key>"},
        "register": {"version": "<register.version>", "decision": "<register.decision>"},
        "approval": {"responded_by_user": {"name": "<approval.responded_by_user.name>"}},
    }
    encode_cache = DEPLOYMENT.cache_dir("encode") + "/<encode.key>"
    shards = plan.encode_shard_options(params, run, images)
    computed = {  # options the DAG computes in TaskFlow tasks rather than templates; a list: mapped
        "models": to_pin, "encode": shards,
        "merge_cache": {"cache": encode_cache, "num_shards": len(shards)},
        "train": plan.training_options(params, run, results["dataset"], encode_cache,
                                       "<mlflow_run.run_id>", results["encode_class_images"]["cache"]
                                       if params["prior_preservation"] else None),
        "evaluate": evaluations,
        "confirm": plan.confirmation_options(params, run, {"checkpoint": "<select.selected.checkpoint>"}, current,
                                            results["dataset"]["hash"]),
    }
    skipped = set() if params["prior_preservation"] else {"class_images", "encode_class_images"}
    kept = trained
    for number in range(1, MAX_RUNGS + 1):  # successive halving: as if the first rates ranked best at each rung
        halve = plan.halving_options(params, run, number, kept)
        if not halve:
            skipped |= {f"rung_{number}.{task}" for task in ("halve", "train", "evaluate")}
            continue
        kept = kept[:max(1, math.ceil(params["halving_keep"] * len(kept)))]
        computed |= {f"rung_{number}.halve": halve, f"rung_{number}.evaluate": plan.evaluation_options(
                         params, run, kept, None, base=False),
                     f"rung_{number}.train": plan.continued_training(params, number, computed["train"],
                                                                     [r["learning_rate"] for r in kept])}
    if not params["require_approval"]:
        skipped.add("promote")  # register promotes; nothing waits
    operator = step_operator_class("kubernetes")
    env = dag.get_template_env()
    pods = []
    for task in in_run_order(dag):
        partial = getattr(task, "partial_kwargs", None)  # a mapped task's
        step = partial.get("step") if partial is not None else getattr(task, "step", None)
        if step is None or task.task_id in skipped:
            continue  # a TaskFlow task: it runs in Airflow, not in a pod
        options = computed[task.task_id] if task.task_id in computed else task.options
        for index, options in enumerate(options) if isinstance(options, list) else [(-1, options)]:
            ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, map_index=index, try_number=1,
                                 xcom_pull=lambda task_ids, **_: results.get(task_ids))
            context = {"params": form, "run_id": run_id, "dag": dag, "ti": ti, "task": task}
            rendered = task.render_template(options, context, env)
            profile = partial.get("profile", "cpu") if partial is not None else task.profile_name
            op = operator(task_id=task.task_id, step=step, profile=profile, options=rendered)
            pod = op.build_pod_request_obj(context, dry_run=True)  # no cluster to ask whether it runs in one
            pods.append((f"{task.task_id}{f'[{index}]' if index >= 0 else ''}: sd_tasks {step} ({profile})", pod))
    return pods


def checkpoint_steps(params: dict) -> list[int]:
    every, last = params["checkpointing_steps"], params["max_steps"]
    return sorted({*range(every, last + 1, every), last})


def in_run_order(dag) -> list:
    """The DAG's tasks, each after everything upstream of it (ties in declaration order)."""
    done, ordered, tasks = set(), [], list(dag.task_dict.values())
    while len(ordered) < len(tasks):
        for task in tasks:
            if task.task_id not in done and task.upstream_task_ids <= done:
                ordered.append(task)
                done.add(task.task_id)
                break
    return ordered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamline.pods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", help="KEY=VALUE file of deployment settings (over the environment)")
    parser.add_argument("--subject", default="dog", help="whose DAG (the subject registry's name)")
    parser.add_argument("--conf", default="{}", help="the DAG run's conf, as JSON")
    parser.add_argument("--images", type=int, default=5, help="images in the dataset (sets the encode shards)")
    parser.add_argument("--no-champion", action="store_true", help="no registered champion to re-evaluate")
    args = parser.parse_args(argv)
    if args.settings:
        os.environ.update(read_settings(args.settings))
    os.environ["DREAMLINE_EXECUTOR"] = "kubernetes"
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        print(f"error: --conf: not JSON ({exc})", file=sys.stderr)
        return 2

    import yaml
    from kubernetes.client import ApiClient

    try:
        with contextlib.redirect_stdout(sys.stderr):  # Airflow's log lines: stdout is the manifests alone
            pods = planned_pods(conf, args.images, not args.no_champion, subject=args.subject)
    except ValueError as exc:  # DeploymentError, also as the settings are first read (importing dreamline.deployment)
        print(f"error: {args.settings or 'environment'}: {exc}", file=sys.stderr)
        return 2
    serialize = ApiClient().sanitize_for_serialization
    for what, pod in pods:
        print(f"---\n# {what}")
        print(yaml.safe_dump(serialize(pod), sort_keys=False, width=120), end="")
    print(f"# {len(pods)} pods", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
