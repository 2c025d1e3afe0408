"""Registers Dreamline's additions to Airflow's API server: the trigger guard that refuses unknown settings
(dreamline.trigger_guard)."""
from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from dreamline.trigger_guard import RefuseUnknownSettings


class DreamlinePlugin(AirflowPlugin):
    name = "dreamline"
    fastapi_root_middlewares = [{"middleware": RefuseUnknownSettings, "name": "Refuse unknown trigger settings"}]
