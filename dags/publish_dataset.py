"""
### Publish a dataset version: a folder of photos becomes the next version of a subject's dataset

Adds the folder to the subject's DVC data registry as a new tagged version (versions are immutable: a tag that
exists is refused) and announces it with an Airflow Asset event for the subject's dataset
(`dreamline://datasets/<subject>`). Subjects with `on_new_data: true` in the subject registry train on it at once;
the others see it at their next scheduled run, when their dataset version is a branch such as `main`.

The photos are a folder inside the deployment's incoming folder (`DREAMLINE_INCOMING`, `.dreamline/incoming` by
default): the form names it (e.g. `dog-2026-12`), and nothing outside it can be published, so a trigger cannot copy
whatever the worker can read (`~/.ssh`, the stack's own state) into the data registry.

Defined for the embedded deployment, where steps run on this machine and the folder is on its disk. In production,
publish from a workstation (`python -m sd_tasks publish-dataset ...`) and announce it through the REST API:
`POST /api/v2/assets/events {"asset_id": <id of dreamline://datasets/<subject>>, "extra": {"tag": "..."}}`.
"""
from __future__ import annotations

from datetime import datetime

from airflow.sdk import AssetAlias, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from dreamline import subjects
from dreamline.deployment import DEPLOYMENT, DeploymentError
from dreamline.operators import StepOperator, param

SUBJECTS = {s.name: s for s in subjects.load()}
PUBLISHED = AssetAlias("dreamline-dataset-versions")


@dag(
    dag_id="publish_dataset",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    doc_md=__doc__,
    params={
        "subject": Param(next(iter(SUBJECTS)), type="string", enum=list(SUBJECTS), title="Subject",
                         description="Whose dataset gets the new version (the subject registry's names)."),
        "source": Param("", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$",
                        title="Folder of photos", description=f"The folder's name inside the incoming folder "
                        f"({DEPLOYMENT.incoming}), e.g. dog-2026-12; nothing outside it is published."),
        "tag": Param("", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", title="Version tag",
                     description="Git tag naming the version, e.g. dog-v2; a tag that exists is refused."),
    },
    tags=["dreamline", "dataset"],
)
def publish_dataset():
    @task
    def registry() -> dict:
        """Where the subject's dataset lives: its data registry and folder."""
        subject = SUBJECTS[get_current_context()["params"]["subject"]]
        return {"repo": subject.dataset_repo or DEPLOYMENT.dataset_repo, "path": subject.dataset_path or subject.name}

    @task
    def photos() -> str:
        """The form's folder inside the incoming folder, symbolic links resolved; anything else refused in one
        line."""
        try:
            return DEPLOYMENT.incoming_folder(get_current_context()["params"]["source"])
        except DeploymentError as exc:
            raise AirflowFailException(str(exc)) from None

    where = registry()
    published = StepOperator(task_id="publish", step="publish-dataset", options={
        "source": "{{ ti.xcom_pull(task_ids='photos') }}", "tag": param("tag"),
        "repo": "{{ ti.xcom_pull(task_ids='registry')['repo'] }}",
        "path": "{{ ti.xcom_pull(task_ids='registry')['path'] }}",
    })

    @task(outlets=[PUBLISHED])
    def dataset_version(result: dict, *, outlet_events=None) -> dict:
        """The Asset event that starts the subject's DAG when it is scheduled on new data."""
        subject = SUBJECTS[get_current_context()["params"]["subject"]]
        extra = {"tag": result["tag"], "commit": result["commit"], "hash": result["hash"]}
        outlet_events[PUBLISHED].add(subject.dataset_asset(), extra=extra)
        return extra

    [where, photos()] >> published
    dataset_version(published.output)


if DEPLOYMENT.executor == "local":
    publish_dataset()
